#!/usr/bin/env bash
# Prepare bench/gpu/carry for the GPU check (bench/gpu/check.py), on the CPU machine.
#
#   bash bench/gpu/prepare.sh
#
# Makes bench/gpu/carry/ (git-ignored; the device `run` call names it in `carry`):
#   llama.cpp/      the llama.cpp sources that llama-server's CUDA build needs, from the pinned
#                   llama-cpp-python sdist in localllm's cache (supervisor/runtime/images.py), trimmed
#   py/gguf/        the gguf package (pure Python): the GPU machine has no gguf, and writes the models
#   alloc           alloc.cu built here with nvcc -arch=sm_90 (a fallback if nvcc fails there)
#   expected.json   the test models' specs and sha256, and localllm's estimate() for each run
# The models themselves are written there: at f32 a 150k-token vocabulary is hundreds of MiB,
# far over the 64 MiB the working tree may carry. tinygguf is deterministic (seeded), and
# check.py compares each model's sha256 with the one recorded here.
#
# Then it proves what it can without a GPU: a CMake configure of the carried tree with the
# device's flags, the web-UI step offline, every C/C++/CUDA source of llama-server preprocessed
# (catches a trimmed-away header), COMPILE_CHECK=1 compiles two CUDA objects, and the size of
# what travels (tracked files + carry) against 64 MiB.
#
# Environment:
#   TIED_EMBEDDINGS=auto|yes|no   TODO(issue 11): the tied model needs
#       supervisor.tinygguf.write_tiny_model(..., tied_embeddings=True), which is being added.
#       auto (default) uses it when the signature has it, and warns loudly when not; set yes once
#       it has landed so that a missing option fails here instead of yielding an untied "tied" model.
#   COMPILE_CHECK=0|1 (default 1)  compile two CUDA objects here (a few minutes on 2 cores)
#   PREPROCESS_CHECK=0|1 (default 1)
#   SDIST_WAIT_S (default 1800)    how long to wait for the sdist that the setup script downloads
#   CUBLAS_DIR                     a folder with include/cublas_v2.h and lib/libcublas.so* for the checks here
#                                  (this machine's CUDA toolkit has no cuBLAS; check.py finds the GPU machine's)
#   SKIP_SOURCES=1                 keep the carried llama.cpp, gguf and alloc; redo models and checks only
#   PYTHON (default .venv/bin/python, else python3)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CARRY=$HERE/carry
LIMIT_BYTES=$((64 * 1024 * 1024))
CARRY_TARGET_BYTES=$((40 * 1024 * 1024))
TIED_EMBEDDINGS=${TIED_EMBEDDINGS:-auto}
COMPILE_CHECK=${COMPILE_CHECK:-1}
PREPROCESS_CHECK=${PREPROCESS_CHECK:-1}
SDIST_WAIT_S=${SDIST_WAIT_S:-1800}
PY=${PYTHON:-}
if [[ -z $PY ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
export PATH="$PATH:/usr/local/cuda/bin"
say() { printf '\n== %s\n' "$*"; }
die() { printf 'prepare.sh: %s\n' "$*" >&2; exit 1; }

cd "$ROOT"
VERSION=$("$PY" -c 'from supervisor.images import LLAMA_CPP_PYTHON_VERSION as v; print(v)')
CACHE=$("$PY" -c 'from supervisor.images import cache_root; print(cache_root())')
SDIST_DIR=$CACHE/llama-server/$VERSION
SDIST=$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz
MEMBER=llama_cpp_python-$VERSION/vendor/llama.cpp

WORK=$(mktemp -d /tmp/gpu-prepare.XXXXXX)
[[ ${KEEP_WORK:-0} == 1 ]] || trap 'rm -rf "$WORK"' EXIT
SKIP_SOURCES=${SKIP_SOURCES:-0}
if [[ $SKIP_SOURCES == 1 ]]; then
    [[ -f $CARRY/llama.cpp/CMakeLists.txt && -d $CARRY/py/gguf && -x $CARRY/alloc ]] || die "SKIP_SOURCES=1 but $CARRY is incomplete"
    echo "SKIP_SOURCES=1: keeping $CARRY/llama.cpp, py and alloc"
else
say "1. the llama-cpp-python $VERSION sdist ($SDIST)"
waited=0
until [[ -f $SDIST ]] && gzip -t "$SDIST" 2>/dev/null; do
    if ((waited >= SDIST_WAIT_S)); then
        die "no complete $SDIST after ${SDIST_WAIT_S} s: run 'localllmctl image build' (or: pip download --no-deps --no-binary :all: llama-cpp-python==$VERSION -d $SDIST_DIR)"
    fi
    ((waited % 60 == 0)) && echo "waiting for the sdist (the setup script downloads it) ..."
    sleep 10
    waited=$((waited + 10))
done
echo "sdist ok: $(du -h "$SDIST" | cut -f1)"

say "2. llama.cpp sources into $CARRY/llama.cpp"
tar -xzf "$SDIST" -C "$WORK" "$MEMBER"
SRC=$WORK/$MEMBER
echo "unpacked: $(du -sh "$SRC" | cut -f1)"
# Keep only what CMake and llama-server's build read. Top level: an explicit list.
KEEP_TOP=(CMakeLists.txt LICENSE cmake common ggml include src tools vendor app licenses scripts)
mkdir -p "$WORK/keep"
for item in "${KEEP_TOP[@]}"; do
    [[ -e $SRC/$item ]] || die "expected $item in llama.cpp; the layout changed, update KEEP_TOP"
    mv "$SRC/$item" "$WORK/keep/"
done
K=$WORK/keep
# scripts/: only the CMake scripts (ui-assets.cmake provisions the web UI at build time)
find "$K/scripts" -mindepth 1 -maxdepth 1 ! -name '*.cmake' -exec rm -rf {} +
# ggml: every backend but CPU and CUDA (the CMake adds a backend's folder only when it is ON)
for backend in blas cann et hexagon hip metal musa opencl openvino rpc sycl virtgpu vulkan webgpu zdnn zendnn; do
    rm -rf "$K/ggml/src/ggml-$backend"
done
# tools: CMake adds every tool's folder, so the folders stay; drop tests, media and the web UI's sources
rm -rf "$K/tools/server/tests" "$K/tools/server/bench" "$K/tools/mtmd/tests" "$K"/tools/mtmd/test-* \
    "$K/tools/server/public_legacy" "$K/tools/server/themes"
find "$K/tools/ui" -mindepth 1 -maxdepth 1 ! -name CMakeLists.txt ! -name sources.cmake \
    ! -name ui.cpp.in ! -name ui.h.in -exec rm -rf {} +
# documentation, images and other non-build files anywhere in what is left
find "$K" -type f \( -iname '*.md' -o -name '*.png' -o -name '*.jpg' -o -name '*.jpeg' -o -name '*.gif' \
    -o -name '*.mp3' -o -name '*.mp4' -o -name '*.wav' -o -name '*.gguf' -o -name '*.ipynb' \) -delete
find "$K" -type d \( -name __pycache__ -o -name .github \) -prune -exec rm -rf {} +
rm -rf "$CARRY/llama.cpp"
mkdir -p "$CARRY"
mv "$K" "$CARRY/llama.cpp"
echo "llama.cpp carried: $(du -sh "$CARRY/llama.cpp" | cut -f1) (from $(du -sh "$SRC" | cut -f1) left of the rest)"

say "3. the gguf package into $CARRY/py"
GGUF_DIR=$("$PY" -c 'import gguf, os; print(os.path.dirname(gguf.__file__))')
GGUF_VERSION=$("$PY" -c 'from importlib.metadata import version; print(version("gguf"))')
rm -rf "$CARRY/py"
mkdir -p "$CARRY/py"
cp -r "$GGUF_DIR" "$CARRY/py/gguf"
find "$CARRY/py" -name __pycache__ -prune -exec rm -rf {} +
echo "gguf $GGUF_VERSION: $(du -sh "$CARRY/py" | cut -f1)"

say "4. alloc.cu (nvcc -arch=sm_90)"
command -v nvcc >/dev/null || die "nvcc not found (looked in PATH and /usr/local/cuda/bin)"
nvcc --version | tail -2
nvcc -O2 -arch=sm_90 -o "$CARRY/alloc" "$HERE/alloc.cu"
echo "built $CARRY/alloc ($(du -h "$CARRY/alloc" | cut -f1))"
fi  # SKIP_SOURCES

say "5. models and estimates (TIED_EMBEDDINGS=$TIED_EMBEDDINGS)"
TIED_OK=$("$PY" -c 'import inspect, supervisor.tinygguf as t; print("tied_embeddings" in inspect.signature(t.write_tiny_model).parameters)')
echo "supervisor.tinygguf.write_tiny_model has tied_embeddings: $TIED_OK"
if [[ $TIED_OK != True ]]; then
    if [[ $TIED_EMBEDDINGS == yes ]]; then die "TIED_EMBEDDINGS=yes but tinygguf has no tied_embeddings yet"; fi
    echo "WARNING: TODO(issue 11): tinygguf cannot write tied embeddings yet, so the 'tied' model is written"
    echo "         WITH output.weight (untied) and the GPU run cannot show the duplicated head."
    echo "         Rerun this script once the option lands (then use TIED_EMBEDDINGS=yes)."
fi
MODELS_DIR=$WORK/models
"$PY" "$HERE/check.py" plan --expected "$CARRY/expected.json" --workdir "$MODELS_DIR" --tied "$TIED_EMBEDDINGS"
ls -la "$MODELS_DIR"
"$PY" - "$CARRY/expected.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for label, r in d["runs"].items():
    e = r["estimate"]
    print(f"  {label:8s} -c {r['context']:6d}: " + ", ".join(f"{k} {e[k] / 2**20:.1f} MiB" for k in ("weights", "kv_cache", "compute", "overhead", "total")))
EOF
rm -rf "$MODELS_DIR"

CONFIGURED=0
if [[ $PREPROCESS_CHECK == 1 || $COMPILE_CHECK == 1 ]]; then
    say "6. CMake configure of the carried tree (the device's flags)"
    BUILD=$WORK/build
    # the same flags as check.py there, and cuBLAS found the same way (toolkit, else a pip wheel, else CUBLAS_DIR)
    if FLAGS=$("$PY" - "$HERE" "$WORK/cuda-shim" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import check
libs = check.find_cuda_libs(Path(sys.argv[2]), placeholder_driver=True)
print(f"cuBLAS: {libs['cublas']}; driver library: {libs['cuda_driver']}", file=sys.stderr)
print(" ".join(check.CMAKE_FLAGS + libs["cmake_flags"]))
EOF
    ); then
        # shellcheck disable=SC2086
        cmake -S "$CARRY/llama.cpp" -B "$BUILD" $FLAGS >"$WORK/configure.log" 2>&1 \
            || { tail -40 "$WORK/configure.log"; die "cmake configure failed"; }
        grep -E "CUDA|Including|ggml version|llama.cpp version|Warning|Error" "$WORK/configure.log" | head -20
        echo "configure ok"
        echo "-- the web UI step, offline:"
        (cd "$BUILD" && ninja llama-ui-assets 2>&1 | tail -3)
        ninja -C "$BUILD" -n llama-server >/dev/null || die "ninja cannot plan llama-server (a source file is missing?)"
        echo "ninja plans llama-server: $(ninja -C "$BUILD" -n llama-server | grep -c '^\[') steps"
        CONFIGURED=1
    else
        echo "WARNING: no cuBLAS here, so the configure, preprocess and compile checks are skipped."
        echo "         This machine's CUDA toolkit may lack it; the GPU machine's PyTorch brings the nvidia-cublas"
        echo "         wheel, which check.py finds. To check here: pip download --no-deps nvidia-cublas, unzip it,"
        echo "         and rerun with CUBLAS_DIR=<unzipped>/nvidia/cu13"
    fi
fi

if [[ $PREPROCESS_CHECK == 1 && $CONFIGURED == 1 ]]; then
    say "7. preprocess every source llama-server compiles (finds trimmed-away headers)"
    ninja -C "$BUILD" -t commands llama-server | grep -E ' -c [^ ]+\.(c|cpp|cu)( |$)' >"$WORK/compile-commands.txt"
    echo "$(wc -l <"$WORK/compile-commands.txt") compile commands"
    # make each one stop after the preprocessor: drop "-o OBJ" and "-MF DEP", add "-E -o /dev/null"
    sed -E 's/ -o [^ ]+/ /; s/ -MD / /; s/ -MF [^ ]+/ /; s/ -MT [^ ]+/ /; s/ -c / -E -o \/dev\/null /' \
        "$WORK/compile-commands.txt" >"$WORK/preprocess.txt"
    failures=0
    export BUILD
    xargs -P "$(nproc)" -d '\n' -I{} bash -c 'cd "$BUILD" && { {} ; } >/dev/null 2>>"'"$WORK"'/preprocess.err" || echo FAIL' \
        <"$WORK/preprocess.txt" >"$WORK/preprocess.out" || true
    failures=$(grep -c FAIL "$WORK/preprocess.out" || true)
    if [[ $failures != 0 ]]; then
        grep -iE "error|No such file" "$WORK/preprocess.err" | sort -u | head -20
        die "$failures sources did not preprocess"
    fi
    echo "all sources preprocess"
fi

if [[ $COMPILE_CHECK == 1 && $CONFIGURED == 1 ]]; then
    say "8. compile two CUDA objects (nvcc -arch=sm_90, as there)"
    for obj in $(ninja -C "$BUILD" -t targets all | grep -oE '^ggml/src/ggml-cuda/CMakeFiles/ggml-cuda\.dir/(argsort|template-instances/fattn-tile-instance-dkq64-dv64)\.cu\.o' | sort -u); do
        start=$(date +%s)
        ninja -C "$BUILD" "$obj" >"$WORK/compile.log" 2>&1 || { tail -30 "$WORK/compile.log"; die "$obj failed"; }
        echo "compiled $obj in $(($(date +%s) - start)) s"
    done
fi

say "9. sizes"
carry_bytes=$(du -sb "$CARRY" | cut -f1)
tracked_bytes=$(git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 du -cb 2>/dev/null) | tail -1 | cut -f1)
untracked_bytes=$(git -C "$ROOT" ls-files -z --others --exclude-standard | (cd "$ROOT" && xargs -0 -r du -cb 2>/dev/null) | tail -1 | cut -f1)
untracked_bytes=${untracked_bytes:-0}
total=$((carry_bytes + tracked_bytes + untracked_bytes))
printf 'carry %.1f MiB (llama.cpp %s, py %s, alloc %s); tracked files %.1f MiB; untracked, not ignored %.1f MiB\n' \
    "$(echo "$carry_bytes / 1048576" | bc -l)" "$(du -sh "$CARRY/llama.cpp" | cut -f1)" "$(du -sh "$CARRY/py" | cut -f1)" \
    "$(du -sh "$CARRY/alloc" | cut -f1)" "$(echo "$tracked_bytes / 1048576" | bc -l)" "$(echo "$untracked_bytes / 1048576" | bc -l)"
printf 'what travels: %.1f MiB of 64 MiB\n' "$(echo "$total / 1048576" | bc -l)"
((carry_bytes <= CARRY_TARGET_BYTES)) || echo "WARNING: carry is over the 40 MiB target"
((total < LIMIT_BYTES)) || die "what travels is over 64 MiB"
git -C "$ROOT" check-ignore -q "$CARRY/" || echo "WARNING: $CARRY is not git-ignored: add 'bench/gpu/carry/' to .gitignore"

say "ready. The device run:"
echo '  run(command="bash bench/gpu/run.sh", carry=["bench/gpu/carry"], timeout_s=590)'
