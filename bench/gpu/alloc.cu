// Take N GiB of GPU memory with plain cudaMalloc, touch every byte, then hold it.
//
//   alloc N        (N may be 0: only the CUDA context, which shows the per-process overhead)
//
// Prints, one "key value" per line on stdout (flushed), then "READY":
//   pid <pid>
//   requested_bytes <bytes>
//   cuda_free_before / cuda_total / cuda_free_after   (cudaMemGetInfo, bytes)
// and then holds the memory until stdin reaches EOF or a line arrives, or a
// signal ends it (bench/gpu/check.py kills it with SIGKILL to time the release).
// Plain cudaMalloc on purpose: never managed memory (see the device notes).

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <unistd.h>
#include <vector>

#define CHECK(call)                                                                \
    do {                                                                           \
        cudaError_t err_ = (call);                                                 \
        if (err_ != cudaSuccess) {                                                 \
            std::printf("error %s at %s:%d: %s\n", #call, __FILE__, __LINE__,      \
                        cudaGetErrorString(err_));                                 \
            std::fflush(stdout);                                                   \
            return 2;                                                              \
        }                                                                          \
    } while (0)

int main(int argc, char **argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s GIB\n", argv[0]);
        return 1;
    }
    const double gib = std::atof(argv[1]);
    if (gib < 0) {
        std::fprintf(stderr, "GIB must not be negative\n");
        return 1;
    }
    const size_t chunk = size_t(1) << 30;  // allocate in 1 GiB pieces, as an allocator would
    const size_t want = size_t(gib * double(chunk));
    std::printf("pid %d\n", int(getpid()));
    std::printf("requested_bytes %zu\n", want);
    std::fflush(stdout);

    CHECK(cudaSetDevice(0));
    CHECK(cudaFree(nullptr));  // create the context before measuring
    size_t free_before = 0, total = 0;
    CHECK(cudaMemGetInfo(&free_before, &total));

    std::vector<void *> blocks;
    size_t left = want;
    while (left > 0) {
        const size_t n = left < chunk ? left : chunk;
        void *p = nullptr;
        CHECK(cudaMalloc(&p, n));
        CHECK(cudaMemset(p, 0xA5, n));  // touch every page
        blocks.push_back(p);
        left -= n;
    }
    CHECK(cudaDeviceSynchronize());
    size_t free_after = 0;
    CHECK(cudaMemGetInfo(&free_after, &total));
    int runtime = 0, driver = 0;
    CHECK(cudaRuntimeGetVersion(&runtime));
    CHECK(cudaDriverGetVersion(&driver));

    std::printf("cuda_runtime_version %d\n", runtime);
    std::printf("cuda_driver_version %d\n", driver);
    std::printf("cuda_total %zu\n", total);
    std::printf("cuda_free_before %zu\n", free_before);
    std::printf("cuda_free_after %zu\n", free_after);
    std::printf("blocks %zu\n", blocks.size());
    std::printf("READY\n");
    std::fflush(stdout);

    // Hold until stdin has a line or closes, or a signal ends the process.
    char line[64];
    if (std::fgets(line, sizeof line, stdin) == nullptr) {
        for (;;) pause();  // stdin closed (e.g. /dev/null): hold until a signal arrives
    }
    for (void *p : blocks) cudaFree(p);
    std::printf("RELEASED\n");
    std::fflush(stdout);
    return 0;
}
