#!/usr/bin/env python3
"""The GPU check of issue 11: what NVML, CUDA and llama-server really do on a GPU, against localllm's estimate.

Runs on the lent GPU machine (bench/gpu/run.sh calls it), with only python3,
nvidia-ml-py, nvcc, cmake and ninja there, and the files bench/gpu/prepare.sh
put into bench/gpu/carry on the CPU machine:

    carry/llama.cpp/   the llama.cpp sources llama-server's CUDA build needs
    carry/py/gguf/     the gguf package (pure Python), to write the test models there
    carry/alloc        alloc.cu built on the CPU machine (used only if nvcc fails there)
    carry/expected.json  the model specs, their sha256 and localllm's estimate() for each

Steps (each one timed, each error recorded, new steps stop after --budget seconds):

 1. machine facts (nvidia-smi -q header, driver, CUDA, nvcc, cmake);
 2. 50 nvmlInit/nvmlShutdown cycles against 50 reads on one kept session (in a
    fresh process, before anything else holds the GPU; then again while held);
 3. llama-server's CUDA build, in the background from here on;
 4. alloc.cu for N in 0, 1, 4 GiB: NVML memory info v1 and v2 before and
    after, the per-process figure against N GiB, whether NVML's PID is the
    launched PID, and how long the memory takes to come back after SIGKILL;
 5. the test models (written with supervisor.runtime.tinygguf, checked against the
    sha256 recorded on the CPU machine);
 6. llama-server on each model (-lv 4 --fit off --flash-attn on, explicit -c,
    --parallel 1, -ngl 999 --device CUDA0): CUDA buffers from the log and NVML's
    per-process memory at readiness and after a 4k-token prompt, against
    estimate(); then two servers on the one GPU at once.

Writes OUT/gpu.md, OUT/gpu.json and the logs (8 files at most come back).

    python3 bench/gpu/check.py --out "$OUT"                 # on the GPU machine
    python3 bench/gpu/check.py --dry-run --out /tmp/gpu-dry  # here: no GPU steps
    python3 bench/gpu/check.py plan --expected FILE          # prepare.sh: specs + estimates
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CARRY = HERE / "carry"
SOURCE = CARRY / "llama.cpp"
EXPECTED = CARRY / "expected.json"
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30

CMAKE_FLAGS = [
    "-G",
    "Ninja",
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_CUDA=ON",
    "-DCMAKE_CUDA_ARCHITECTURES=90",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    # no network there: build without the web UI instead of trying to download it
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    # one GPU: do not pick up a pip-installed NCCL
    "-DGGML_CUDA_NCCL=OFF",
    # the runs use an f16 KV cache: compile only its flash-attention vector kernels (a shorter build;
    # the default adds q4_0, q8_0 and bf16 pairs, which these runs never use)
    "-DGGML_CUDA_FA_QUANTS=f16-f16",
]

HARD_EXTRA_S = 45.0  # after the budget, running steps get this long to finish; run.sh's timeout_s is above both
CONTEXT = 8192
PROMPT_TOKENS = 4096
N_PREDICT = 8
ALLOC_GIB = (0, 1, 4)
NVML_CYCLES = 50

# The test models. "tied" and "untied" differ only in the output head: llama.cpp
# puts a copy of token_embd on the GPU as the head when the file has no
# output.weight, so both should show the same CUDA model buffer.
MODELS = {
    "tied": dict(
        embedding=512,
        blocks=4,
        heads=8,
        kv_heads=4,
        context=CONTEXT,
        extra_vocab=150_000,
        seed=11,
        name="gpu-check-tied",
        tied=True,
    ),
    "untied": dict(
        embedding=512,
        blocks=4,
        heads=8,
        kv_heads=4,
        context=CONTEXT,
        extra_vocab=150_000,
        seed=11,
        name="gpu-check-untied",
        tied=False,
    ),
    "mid": dict(
        embedding=1024,
        blocks=8,
        heads=16,
        kv_heads=4,
        context=4 * CONTEXT,
        extra_vocab=0,
        seed=13,
        name="gpu-check-mid",
        tied=False,
    ),
}
# What runs: (label, model, context); the pair runs at the same time on one GPU.
SINGLE_RUNS = [("tied", "tied", CONTEXT), ("untied", "untied", CONTEXT)]
PAIR_RUNS = [("pair-a", "mid", CONTEXT), ("pair-b", "mid", 2 * CONTEXT)]

_BUFFER = re.compile(r"(\S+)\s+(model|KV|compute|output|RS) buffer size =\s*([\d.]+) MiB")
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_INTERESTING = re.compile(
    r"buffer size|offloaded|CUDA|using device|ggml_cuda_init|Device \d|flash_attn|n_ctx|"
    r"n_seq_max|kv_unified|n_ubatch|n_batch|error|failed",
    re.IGNORECASE,
)


# ---------------------------------------------------------------- the report


class Report:
    def __init__(self, out: Path, budget: float, dry_run: bool, argv: list[str]):
        self.out = out
        self.started = time.monotonic()
        self.deadline = self.started + budget
        self.dry_run = dry_run
        self.data: dict = {
            "command": "bash bench/gpu/run.sh" if not dry_run else "python3 bench/gpu/check.py " + " ".join(argv),
            "argv": argv,
            "dry_run": dry_run,
            "budget_s": budget,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "steps": {},
            "errors": [],
        }
        self.lock = threading.Lock()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def hard_left(self) -> float:
        """Seconds until every wait must have ended (the budget plus HARD_EXTRA_S): what a step may still spend."""
        return self.deadline + HARD_EXTRA_S - time.monotonic()

    def step(self, name: str, fn, *, need_s: float = 5.0, gpu: bool = False):
        """Run ``fn`` as one step; its return value is the step's result. Never raises."""
        entry: dict = {"started_at_s": round(self.elapsed(), 2)}
        self.data["steps"][name] = entry
        if gpu and self.dry_run:
            entry.update(ok=None, skipped="dry run: no GPU")
            log(f"[{name}] skipped (dry run)")
            return None
        if self.left() < need_s:
            entry.update(ok=None, skipped=f"budget: {self.left():.0f} s left, step needs about {need_s:.0f} s")
            log(f"[{name}] skipped: out of budget")
            return None
        log(f"[{name}] start at {self.elapsed():.1f} s")
        t0 = time.monotonic()
        try:
            result = fn()
            entry.update(ok=True, result=result)
            return result
        except BaseException as exc:  # noqa: BLE001 - every error goes into the report
            if isinstance(exc, KeyboardInterrupt):
                raise
            entry.update(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            self.error(name, exc)
            return None
        finally:
            entry["seconds"] = round(time.monotonic() - t0, 3)
            log(f"[{name}] done in {entry['seconds']:.1f} s (ok={entry.get('ok')})")

    def error(self, where: str, exc: BaseException | str) -> None:
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        with self.lock:
            self.data["errors"].append({"where": where, "error": text, "at_s": round(self.elapsed(), 2)})
        log(f"ERROR [{where}] {text}")


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


# ---------------------------------------------------------------- processes


class Processes:
    """Every child this script starts, so that the end can kill what is left."""

    def __init__(self):
        self.children: list[subprocess.Popen] = []

    def start(self, args, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen([str(a) for a in args], **kwargs)
        self.children.append(proc)
        return proc

    @staticmethod
    def session_members(sid: int) -> list[int]:
        """PIDs in session ``sid``: ninja puts each compile in its own process group, so killpg misses them."""
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != sid:
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    if int(fields[3]) == sid:  # after the name: state, ppid, pgrp, session
                        pids.append(int(entry))
                except (OSError, IndexError, ValueError):
                    pass
        return pids

    @staticmethod
    def kill_session(sid: int) -> None:
        for pid in Processes.session_members(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    @staticmethod
    def stop(proc: subprocess.Popen, grace: float = 5.0, sig=signal.SIGTERM) -> None:
        if proc.poll() is not None:
            Processes.kill_session(proc.pid)  # what it left behind (started with start_new_session)
            return
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        Processes.kill_session(proc.pid)

    def stop_all(self) -> None:
        for proc in self.children:
            self.stop(proc, grace=2.0)


PROCS = Processes()


def run(args, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)


# ---------------------------------------------------------------- NVML


def nvml_module():
    import pynvml  # nvidia-ml-py

    return pynvml


def _num(value):
    return int(value) if value is not None else None


def mem_v1(nv, handle) -> dict:
    m = nv.nvmlDeviceGetMemoryInfo(handle)
    return {"total": int(m.total), "used": int(m.used), "free": int(m.free)}


def mem_v2(nv, handle) -> dict:
    try:
        m = nv.nvmlDeviceGetMemoryInfo(handle, version=nv.nvmlMemory_v2)
        return {"total": int(m.total), "reserved": int(m.reserved), "used": int(m.used), "free": int(m.free)}
    except Exception as exc:  # noqa: BLE001 - absent on old drivers/bindings: say so
        return {"error": f"{type(exc).__name__}: {exc}"}


def mem_both(nv, handle) -> dict:
    return {"v1": mem_v1(nv, handle), "v2": mem_v2(nv, handle), "t": round(time.monotonic(), 3)}


def processes(nv, handle) -> list[dict]:
    rows = []
    for fn in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            for p in getattr(nv, fn)(handle):
                used = getattr(p, "usedGpuMemory", None)
                rows.append({"pid": int(p.pid), "used": _num(used), "kind": fn.split("Get")[1].split("Running")[0]})
        except Exception as exc:  # noqa: BLE001
            rows.append({"error": f"{fn}: {type(exc).__name__}: {exc}"})
    return rows


def used_by(rows: list[dict], pid: int) -> int | None:
    """NVML's per-process figure for ``pid`` (None: not listed)."""
    found = [r["used"] for r in rows if r.get("pid") == pid and r.get("used") is not None]
    return max(found) if found else None


def nvml_cycles(count: int, cap_s: float = 25.0) -> dict:
    """Run in a fresh process: ``count`` init/shutdown cycles (fewer if they pass ``cap_s``), then reads on one
    session."""
    nv = nvml_module()
    cycles = []
    started = time.perf_counter()
    for _ in range(count):
        if time.perf_counter() - started > cap_s:
            break
        t0 = time.perf_counter()
        nv.nvmlInit()
        handle = nv.nvmlDeviceGetHandleByIndex(0)
        nv.nvmlDeviceGetMemoryInfo(handle)
        nv.nvmlShutdown()
        cycles.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    nv.nvmlInit()
    first_init = time.perf_counter() - t0
    handle = nv.nvmlDeviceGetHandleByIndex(0)
    reads, reads_full = [], []
    for _ in range(count):
        t0 = time.perf_counter()
        nv.nvmlDeviceGetMemoryInfo(handle)
        reads.append(time.perf_counter() - t0)
    for _ in range(count):
        t0 = time.perf_counter()
        nv.nvmlDeviceGetMemoryInfo(handle)
        try:
            nv.nvmlDeviceGetMemoryInfo(handle, version=nv.nvmlMemory_v2)
        except Exception:  # noqa: BLE001
            pass
        nv.nvmlDeviceGetComputeRunningProcesses(handle)
        reads_full.append(time.perf_counter() - t0)
    nv.nvmlShutdown()

    def summary(values):
        ms = [v * 1000 for v in values]
        return {
            "n": len(ms),
            "total_ms": round(sum(ms), 3),
            "mean_ms": round(statistics.mean(ms), 4),
            "median_ms": round(statistics.median(ms), 4),
            "min_ms": round(min(ms), 4),
            "max_ms": round(max(ms), 4),
        }

    return {
        "init_read_shutdown": summary(cycles),
        "read_v1_on_kept_session": summary(reads),
        "read_v1_v2_processes_on_kept_session": summary(reads_full),
        "init_after_cycles_ms": round(first_init * 1000, 3),
    }


def nvml_cycles_subprocess(count: int, timeout: float) -> dict:
    proc = run([sys.executable, __file__, "nvml-cycles", "--count", str(count)], timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"nvml-cycles exited {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- machine facts


def machine_facts(nvml_ok: bool) -> dict:
    facts: dict = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    try:
        with open("/proc/meminfo") as f:
            facts["mem_total_kib"] = int(f.readline().split()[1])
    except OSError:
        pass
    for name, args in {
        "nvidia_smi_q": ["nvidia-smi", "-q"],
        "nvidia_smi": ["nvidia-smi"],
        "nvcc": ["nvcc", "--version"],
        "cmake": ["cmake", "--version"],
        "ninja": ["ninja", "--version"],
    }.items():
        exe = shutil.which(args[0]) or (
            f"/usr/local/cuda/bin/{args[0]}" if Path(f"/usr/local/cuda/bin/{args[0]}").exists() else None
        )
        if not exe:
            facts[name] = "not found"
            continue
        try:
            proc = run([exe, *args[1:]], timeout=30)
            text = (proc.stdout + proc.stderr).strip()
            facts[name] = "\n".join(text.splitlines()[:40]) if name == "nvidia_smi_q" else text[-1500:]
        except Exception as exc:  # noqa: BLE001
            facts[name] = f"{type(exc).__name__}: {exc}"
    try:
        from importlib.metadata import version

        import pynvml  # noqa: F401

        facts["nvidia_ml_py"] = version("nvidia-ml-py")
    except Exception as exc:  # noqa: BLE001
        facts["nvidia_ml_py"] = f"unavailable: {exc}"
    return facts


def nvml_device_facts(nv, handle) -> dict:
    facts: dict = {}

    def get(key, fn, *args):
        try:
            value = fn(*args)
            facts[key] = value.decode() if isinstance(value, bytes) else value
        except Exception as exc:  # noqa: BLE001
            facts[key] = f"{type(exc).__name__}: {exc}"

    get("name", nv.nvmlDeviceGetName, handle)
    get("uuid", nv.nvmlDeviceGetUUID, handle)
    get("driver", nv.nvmlSystemGetDriverVersion)
    get("cuda_driver_version", nv.nvmlSystemGetCudaDriverVersion)
    get("nvml_version", nv.nvmlSystemGetNVMLVersion)
    get("persistence_mode", nv.nvmlDeviceGetPersistenceMode, handle)
    get("compute_mode", nv.nvmlDeviceGetComputeMode, handle)
    get("mig_mode", nv.nvmlDeviceGetMigMode, handle)
    get("device_count", nv.nvmlDeviceGetCount)
    facts["memory"] = mem_both(nv, handle)
    facts["processes"] = processes(nv, handle)
    return facts


# ---------------------------------------------------------------- the build


def find_cuda_libs(shim_dir: Path, placeholder_driver: bool = False) -> dict:
    """cuBLAS and the driver library for the build, with CMake flags where CMake would not find them.

    cuBLAS: the CUDA toolkit's own, else the pip wheel (nvidia-cublas) beside PyTorch. A toolkit
    without cuBLAS (only nvcc and cudart, as on the CPU machine this was prepared on) fails CMake
    with "Target ggml-cuda links to: CUDA::cublas but the target was not found". The wheel ships
    include/cublas_v2.h and lib/libcublas.so.13 but no unversioned libcublas.so, so a shim folder of
    links gives CMake what it looks for; the servers then run with LD_LIBRARY_PATH set.
    Set CUBLAS_DIR to a folder with include/ and lib/ to choose one.

    The driver (CUDA::cuda_driver, for the VMM pool): the toolkit's stubs/libcuda.so, else the real
    libcuda.so.1 (ldconfig, /usr/local/nvidia). ``placeholder_driver``: for a configure-only check on
    a machine with no driver at all, an empty placeholder file (nothing is linked there).
    """
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    toolkit = Path(os.path.realpath(nvcc)).parent.parent
    result = {"cmake_flags": [], "ld_library_path": None}
    shim_dir.mkdir(parents=True, exist_ok=True)

    def link(name: str, target: Path) -> Path:
        path = shim_dir / name
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to(target.resolve())
        return path

    # cuBLAS
    candidates: list[Path] = []
    toolkit_include = None
    if os.environ.get("CUBLAS_DIR"):
        candidates.append(Path(os.environ["CUBLAS_DIR"]))
    else:
        for include in (
            toolkit / "include",
            toolkit / "targets" / "x86_64-linux" / "include",
            Path("/usr/local/cuda/include"),
            Path("/usr/include"),
        ):
            if (include / "cublas_v2.h").is_file():
                toolkit_include = include
                break
        if toolkit_include is None:
            import site

            roots = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
            for root in dict.fromkeys(str(r) for r in roots if r):
                for pattern in ("nvidia/cu*/include/cublas_v2.h", "nvidia/cublas/include/cublas_v2.h"):
                    candidates += [h.parent.parent for h in sorted(Path(root).glob(pattern))]
    if toolkit_include is not None:
        result["cublas"] = f"CUDA toolkit ({toolkit_include})"
    else:
        for base in candidates:
            include, lib = base / "include", base / "lib"
            libs = {name: sorted(lib.glob(f"lib{name}.so*")) for name in ("cublas", "cublasLt")}
            if not (include / "cublas_v2.h").is_file() or not all(libs.values()):
                continue
            for name, found in libs.items():
                result["cmake_flags"].append(f"-DCUDA_{name}_LIBRARY={link(f'lib{name}.so', found[-1])}")
            result["cmake_flags"].append(f"-DCMAKE_CUDA_FLAGS=-I{include}")
            result["cublas"] = f"pip wheel ({base})"
            result["ld_library_path"] = str(lib.resolve())
            break
        else:
            raise FileNotFoundError(
                "no cuBLAS: neither the CUDA toolkit nor a pip nvidia-cublas wheel has "
                "cublas_v2.h and libcublas.so; set CUBLAS_DIR to a folder with include/ and lib/"
            )

    # the driver library
    stubs = [toolkit / d / "libcuda.so" for d in ("lib64/stubs", "lib/stubs", "targets/x86_64-linux/lib/stubs")]
    plain = [
        Path(d) / "libcuda.so"
        for d in (
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
            "/usr/local/nvidia/lib64",
            "/usr/local/nvidia/lib",
        )
    ]
    if os.environ.get("CUDA_DRIVER_LIBRARY"):  # a chosen libcuda (or, for a configure-only test, any file)
        result["cmake_flags"].append(f"-DCUDA_cuda_driver_LIBRARY={os.environ['CUDA_DRIVER_LIBRARY']}")
        result["cuda_driver"] = f"CUDA_DRIVER_LIBRARY={os.environ['CUDA_DRIVER_LIBRARY']}"
        return result
    found = next((p for p in stubs + plain if p.exists()), None)
    if found is not None:
        result["cuda_driver"] = f"found by CMake ({found})"
        return result
    versioned = []
    try:
        listing = run(["ldconfig", "-p"], timeout=10).stdout
        versioned += [Path(line.split("=>")[-1].strip()) for line in listing.splitlines() if "libcuda.so.1 " in line]
    except Exception:  # noqa: BLE001
        pass
    versioned += [
        Path(d) / "libcuda.so.1"
        for d in ("/usr/local/nvidia/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/nvidia/lib")
    ]
    real = next((p for p in versioned if p.exists()), None)
    if real is not None:
        result["cmake_flags"].append(f"-DCUDA_cuda_driver_LIBRARY={link('libcuda.so', real)}")
        result["cuda_driver"] = f"{real} (through a link in {shim_dir})"
    elif placeholder_driver:
        placeholder = shim_dir / "libcuda.so"
        if placeholder.is_symlink():
            placeholder.unlink()
        placeholder.write_bytes(b"")
        result["cmake_flags"].append(f"-DCUDA_cuda_driver_LIBRARY={placeholder}")
        result["cuda_driver"] = "placeholder (configure-only check: no driver on this machine)"
    else:
        raise FileNotFoundError("no libcuda.so or libcuda.so.1 (toolkit stubs, ldconfig, /usr/local/nvidia)")
    return result


class Build:
    """llama-server's CUDA build, in a background thread from configure to link."""

    def __init__(self, report: Report, build_dir: Path, log_path: Path, jobs: int, extra_flags: list[str]):
        self.report, self.build_dir, self.log_path, self.jobs = report, build_dir, log_path, jobs
        self.extra_flags = extra_flags
        self.result: dict = {"state": "not started"}
        self.done = threading.Event()
        self.proc: subprocess.Popen | None = None
        self.cublas: dict = {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def binary(self) -> Path:
        return self.build_dir / "bin" / "llama-server"

    def start(self) -> None:
        self.result = {"state": "running", "source": str(SOURCE), "build_dir": str(self.build_dir)}
        self.thread.start()

    def _phase(self, args: list[str], log, deadline: float) -> tuple[int, float]:
        t0 = time.monotonic()
        log.write(f"\n$ {' '.join(args)}\n")
        log.flush()
        self.proc = PROCS.start(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                Processes.stop(self.proc, grace=3, sig=signal.SIGKILL)
                return -9, time.monotonic() - t0
            time.sleep(0.5)
        return self.proc.returncode, time.monotonic() - t0

    def _run(self) -> None:
        try:
            if not (SOURCE / "CMakeLists.txt").is_file():
                raise FileNotFoundError(f"{SOURCE}/CMakeLists.txt missing: run bash bench/gpu/prepare.sh first")
            if not shutil.which("nvcc") and Path("/usr/local/cuda/bin/nvcc").exists():
                os.environ["PATH"] = "/usr/local/cuda/bin:" + os.environ.get("PATH", "")
            self.cublas = find_cuda_libs(self.build_dir.parent / "cuda-shim")
            self.result.update(
                cuda_libs=self.cublas,
                configure=[
                    "cmake",
                    "-S",
                    str(SOURCE),
                    "-B",
                    str(self.build_dir),
                    *CMAKE_FLAGS,
                    *self.cublas["cmake_flags"],
                    *self.extra_flags,
                ],
                build=["cmake", "--build", str(self.build_dir), "--target", "llama-server", f"-j{self.jobs}"],
            )
            # leave time after the build for the server runs (about 35 s on the GPU)
            deadline = self.report.deadline - 40
            with open(self.log_path, "w") as log:
                rc, seconds = self._phase(self.result["configure"], log, deadline)
                self.result.update(configure_rc=rc, configure_s=round(seconds, 1))
                if rc != 0:
                    raise RuntimeError(f"cmake configure exited {rc} (see build.log)")
                rc, seconds = self._phase(self.result["build"], log, deadline)
                self.result.update(build_rc=rc, build_s=round(seconds, 1))
                if rc == -9:
                    raise TimeoutError(f"build stopped at the budget after {seconds:.0f} s")
                if rc != 0:
                    raise RuntimeError(f"build exited {rc} (see build.log)")
            if not self.binary.is_file():
                raise FileNotFoundError(f"{self.binary} not built")
            self.result.update(state="ok", binary=str(self.binary), binary_bytes=self.binary.stat().st_size)
        except Exception as exc:  # noqa: BLE001
            self.result.update(state="failed", error=f"{type(exc).__name__}: {exc}")
            self.report.error("build", exc)
        finally:
            self.result["total_s"] = round(sum(self.result.get(k, 0) for k in ("configure_s", "build_s")), 1)
            self.done.set()


def ninja_progress(log_path: Path) -> str:
    try:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.startswith("[")]
        return lines[-1][:120] if lines else ""
    except OSError:
        return ""


# ---------------------------------------------------------------- alloc.cu


def alloc_binary(workdir: Path) -> dict:
    """Build alloc.cu there (-arch=sm_90); fall back to the one prepare.sh built."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    target = workdir / "alloc"
    t0 = time.monotonic()
    try:
        proc = run([nvcc, "-O2", "-arch=sm_90", "-o", target, HERE / "alloc.cu"], timeout=120)
        if proc.returncode == 0 and target.is_file():
            return {"binary": str(target), "built_here_s": round(time.monotonic() - t0, 2)}
        note = f"nvcc exited {proc.returncode}: {proc.stderr[-1000:]}"
    except Exception as exc:  # noqa: BLE001
        note = f"{type(exc).__name__}: {exc}"
    carried = CARRY / "alloc"
    if carried.is_file():
        return {"binary": str(carried), "nvcc_failed": note, "used": "carried build"}
    raise RuntimeError(f"no alloc binary: {note}")


def read_lines_until(proc: subprocess.Popen, marker: str, timeout: float) -> tuple[dict, list[str]]:
    """Read ``key value`` lines from the child's stdout until ``marker`` (in a thread, with a timeout)."""
    lines: list[str] = []
    done = threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.strip() == marker or line.startswith("error"):
                break
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    done.wait(timeout)
    values = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            values[parts[0]] = int(parts[1])
    return values, lines


def alloc_experiment(nv, handle, binary: str, gib: float, log_lines: list[str]) -> dict:
    before = mem_both(nv, handle)
    procs_before = processes(nv, handle)
    t0 = time.monotonic()
    proc = PROCS.start(
        [binary, gib], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    values, lines = read_lines_until(proc, "READY", timeout=60)
    log_lines += [f"--- alloc {gib} GiB (pid {proc.pid})", *lines]
    if "READY" not in lines:
        Processes.stop(proc, grace=1, sig=signal.SIGKILL)
        raise RuntimeError(f"alloc {gib} did not get ready: {lines[-5:]}")
    ready_s = time.monotonic() - t0
    time.sleep(0.3)  # let NVML's view settle
    after = mem_both(nv, handle)
    rows = processes(nv, handle)
    per_process = used_by(rows, proc.pid)
    requested = values.get("requested_bytes", int(gib * GIB))
    listed_pids = sorted({r["pid"] for r in rows if "pid" in r} - {r["pid"] for r in procs_before if "pid" in r})
    result = {
        "gib": gib,
        "launched_pid": proc.pid,
        "printed_pid": values.get("pid"),
        "ready_s": round(ready_s, 3),
        "nvml_pids_new": listed_pids,
        "nvml_pid_equals_launched_pid": any(r.get("pid") == proc.pid for r in rows),
        "nvml_used_by_process": per_process,
        "requested_bytes": requested,
        "overhead_bytes": (per_process - requested) if per_process is not None else None,
        "before": before,
        "after": after,
        "device_used_delta_v1": after["v1"]["used"] - before["v1"]["used"],
        "device_used_delta_v2": (after["v2"]["used"] - before["v2"]["used"])
        if "used" in after["v2"] and "used" in before["v2"]
        else None,
        "cuda_free_before": values.get("cuda_free_before"),
        "cuda_free_after": values.get("cuda_free_after"),
        "cuda_total": values.get("cuda_total"),
        "cuda_runtime_version": values.get("cuda_runtime_version"),
        "cuda_driver_version": values.get("cuda_driver_version"),
        "processes_at_ready": rows,
    }
    if result["cuda_free_before"] is not None and result["cuda_free_after"] is not None:
        result["cuda_free_drop"] = result["cuda_free_before"] - result["cuda_free_after"]
    result["release"] = time_release(nv, handle, proc, before["v1"]["used"])
    return result


def time_release(
    nv,
    handle,
    proc: subprocess.Popen,
    baseline_used: int | None,
    sig=signal.SIGKILL,
    timeout: float = 30.0,
    slack: int = 16 * MIB,
) -> dict:
    """Kill ``proc`` and poll NVML every 50 ms: when does its PID leave the list, when is the memory back?"""
    pid = proc.pid
    t0 = time.monotonic()
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    gone_s = back_s = exited_s = None
    polls = 0
    last = None
    while time.monotonic() - t0 < timeout:
        now = time.monotonic() - t0
        if exited_s is None and proc.poll() is not None:
            exited_s = now
        rows = processes(nv, handle)
        last = mem_v1(nv, handle)
        polls += 1
        if gone_s is None and used_by(rows, pid) is None and not any(r.get("pid") == pid for r in rows):
            gone_s = now
        if back_s is None and baseline_used is not None and last["used"] <= baseline_used + slack:
            back_s = now
        if gone_s is not None and exited_s is not None and (back_s is not None or baseline_used is None):
            break
        time.sleep(0.05)
    if proc.poll() is None:
        Processes.stop(proc, grace=2, sig=signal.SIGKILL)
    return {
        "signal": signal.Signals(sig).name,
        "process_exited_s": _r(exited_s),
        "pid_left_nvml_s": _r(gone_s),
        "memory_back_s": _r(back_s),
        "baseline_used": baseline_used,
        "slack_bytes": slack,
        "last_used": last["used"] if last else None,
        "polls": polls,
        "poll_interval_s": 0.05,
        "timed_out": gone_s is None or (baseline_used is not None and back_s is None),
    }


def _r(value):
    return round(value, 3) if value is not None else None


# ---------------------------------------------------------------- models and estimates


def import_project():
    """supervisor.* from the repo, gguf from the carry folder if not installed."""
    for path in (str(ROOT), str(CARRY / "py")):
        if path not in sys.path:
            sys.path.insert(0 if path == str(ROOT) else len(sys.path), path)
    import supervisor.runtime.tinygguf as tinygguf
    from supervisor.core import estimate as est
    from supervisor.runtime import gguf_meta

    return tinygguf, est, gguf_meta


def tied_supported() -> bool:
    tinygguf, _, _ = import_project()
    return "tied_embeddings" in inspect.signature(tinygguf.write_tiny_model).parameters


def write_model(spec: dict, path: Path, tied_ok: bool) -> dict:
    tinygguf, _, _ = import_project()
    kwargs = {
        k: spec[k] for k in ("embedding", "blocks", "heads", "kv_heads", "context", "extra_vocab", "seed", "name")
    }
    tied = bool(spec.get("tied")) and tied_ok
    if tied:
        kwargs["tied_embeddings"] = True
    t0 = time.monotonic()
    tinygguf.write_tiny_model(path, **kwargs)
    seconds = time.monotonic() - t0
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "sha256": sha256(path),
        "written_s": round(seconds, 2),
        "tied_requested": bool(spec.get("tied")),
        "tied_written": tied,
    }


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(16 * MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def launch_settings(est, context: int):
    fields = {f.name for f in dataclasses.fields(est.LaunchSettings)}
    wanted = {
        "context": context,
        "parallel": 1,
        "on_gpu": True,
        "gpu_layers": -1,
        "flash_attention": True,
        "cache_type_k": "f16",
        "cache_type_v": "f16",
        "ubatch": 512,
        # fields that later versions may add: the server runs with --parallel 1 and no -kvu
        "kv_unified": False,
    }
    return est.LaunchSettings(**{k: v for k, v in wanted.items() if k in fields})


def estimate_for(path: Path, context: int) -> dict:
    _, est, gguf_meta = import_project()
    facts = gguf_meta.read_gguf_facts(path)
    launch = launch_settings(est, context)
    result = est.estimate(facts, launch)
    plain = dataclasses.asdict(facts)
    for key in ("layer_bytes", "swa_layers", "head_count_kv"):
        values = plain.pop(key)
        plain[key + "_sum" if key == "layer_bytes" else key] = sum(values) if key == "layer_bytes" else values[:1]
    return {
        "context": context,
        "launch": dataclasses.asdict(launch),
        "estimate": result.as_dict(),
        "facts": {k: (list(v) if isinstance(v, tuple) else v) for k, v in plain.items()},
    }


def plan(expected_path: Path, workdir: Path, tied_mode: str) -> dict:
    """prepare.sh's step: write each model here, hash it, and record estimate() for each run."""
    supported = tied_supported()
    if tied_mode == "yes" and not supported:
        raise SystemExit("TIED_EMBEDDINGS=yes but tinygguf.write_tiny_model has no tied_embeddings yet")
    tied_ok = supported if tied_mode == "auto" else tied_mode == "yes"
    workdir.mkdir(parents=True, exist_ok=True)
    models = {}
    for name, spec in MODELS.items():
        path = workdir / f"{name}.gguf"
        info = write_model(spec, path, tied_ok)
        info.update(spec=spec)
        models[name] = info
        log(f"model {name}: {info['bytes'] / MIB:.1f} MiB, tied={info['tied_written']}, {info['written_s']} s")
    runs = {}
    for label, model, context in SINGLE_RUNS + PAIR_RUNS:
        runs[label] = {"model": model, **estimate_for(workdir / f"{model}.gguf", context)}
    commit = ""
    try:
        commit = run(["git", "-C", ROOT, "rev-parse", "HEAD"], timeout=10).stdout.strip()
        dirty = run(["git", "-C", ROOT, "status", "--porcelain", "supervisor"], timeout=10).stdout.strip()
        commit += " (supervisor/ has uncommitted changes)" if dirty else ""
    except Exception:  # noqa: BLE001
        pass
    data = {
        "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "repo_commit": commit,
        "tied_embeddings_supported": supported,
        "tied_mode": tied_mode,
        "models": models,
        "runs": runs,
        "numpy": __import__("numpy").__version__,
        "gguf": _gguf_version(),
    }
    expected_path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def _gguf_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # noqa: BLE001
        return "unknown (carried package)"


# ---------------------------------------------------------------- llama-server


def parse_server_log(text: str) -> dict:
    buffers: dict = {}
    lines = []
    for line in text.splitlines():
        match = _BUFFER.search(line)
        if match:
            name, kind, mib = match.group(1), match.group(2), float(match.group(3))
            buffers[f"{name} {kind}"] = mib  # the last report of each wins
            lines.append(line.strip())
    offloaded = _OFFLOADED.search(text)
    device_mib = {
        kind: sum(
            v
            for k, v in buffers.items()
            if k.startswith("CUDA") and not k.startswith("CUDA_Host") and k.endswith(" " + kind)
        )
        for kind in ("model", "KV", "compute", "output", "RS")
    }
    host = {k: v for k, v in buffers.items() if not (k.startswith("CUDA") and not k.startswith("CUDA_Host"))}
    interesting = [line.strip() for line in text.splitlines() if _INTERESTING.search(line)][:200]
    return {
        "buffers_mib": buffers,
        "buffer_lines": lines,
        "cuda_device_mib": device_mib,
        "host_buffers_mib": host,
        "cuda_device_total_mib": round(sum(device_mib.values()), 2),
        "offloaded": [int(offloaded.group(1)), int(offloaded.group(2))] if offloaded else None,
        "interesting_lines": interesting,
    }


def http_json(url: str, payload: dict | None = None, timeout: float = 10) -> tuple[int, dict | str]:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read().decode(errors="replace")
            status = response.status
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read().decode(errors="replace")
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body[:2000]


class Server:
    def __init__(
        self,
        label: str,
        binary: Path,
        model: Path,
        context: int,
        port: int,
        log_path: Path,
        gpu: bool,
        env: dict | None = None,
    ):
        self.env = env
        self.label, self.binary, self.model, self.context, self.port, self.log_path = (
            label,
            binary,
            model,
            context,
            port,
            log_path,
        )
        self.args = [
            str(binary),
            "-m",
            str(model),
            "-lv",
            "4",
            "--fit",
            "off",
            "--flash-attn",
            "on",
            "-c",
            str(context),
            "--parallel",
            "1",
        ]
        self.args += ["-ngl", "999", "--device", "CUDA0"] if gpu else ["-ngl", "0"]
        self.args += ["--host", "127.0.0.1", "--port", str(port)]
        self.proc: subprocess.Popen | None = None
        self.log_file = None

    def start(self) -> None:
        self.log_file = open(self.log_path, "w")
        self.log_file.write(f"$ {' '.join(self.args)}\n")
        self.log_file.flush()
        self.started = time.monotonic()
        self.proc = PROCS.start(
            self.args, stdout=self.log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env
        )

    def wait_ready(self, timeout: float) -> float:
        while time.monotonic() - self.started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.label}: llama-server exited {self.proc.returncode} before /health; "
                    f"log tail: {self.log_tail()}"
                )
            try:
                status, _ = http_json(f"http://127.0.0.1:{self.port}/health", timeout=2)
                if status == 200:
                    return time.monotonic() - self.started
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.label}: no /health 200 within {timeout:.0f} s; log tail: {self.log_tail()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 8) -> str:
        return " | ".join(self.log_text().splitlines()[-n:])

    def prompt(self, tokens: int, vocab: int, timeout: float) -> dict:
        first = 259  # after the 3 special and 256 byte tokens that tinygguf writes
        span = max(1, vocab - first)
        ids = [first + (i * 7919) % span for i in range(tokens)]
        t0 = time.monotonic()
        status, body = http_json(
            f"http://127.0.0.1:{self.port}/completion",
            {"prompt": ids, "n_predict": N_PREDICT, "cache_prompt": False, "temperature": 0.0},
            timeout=timeout,
        )
        seconds = time.monotonic() - t0
        if status != 200 or not isinstance(body, dict):
            raise RuntimeError(f"{self.label}: /completion answered {status}: {str(body)[:500]}")
        timings = body.get("timings") or {}
        return {
            "status": status,
            "seconds": round(seconds, 3),
            "prompt_tokens_sent": tokens,
            "tokens_evaluated": body.get("tokens_evaluated"),
            "tokens_predicted": body.get("tokens_predicted"),
            "prompt_n": timings.get("prompt_n"),
            "prompt_ms": timings.get("prompt_ms"),
            "predicted_n": timings.get("predicted_n"),
            "predicted_ms": timings.get("predicted_ms"),
        }

    def stop(self) -> None:
        if self.proc is not None:
            Processes.stop(self.proc, grace=10)
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None


def server_memory(nv, handle, server: Server) -> dict:
    if nv is None:
        return {"nvml": "unavailable (dry run)"}
    rows = processes(nv, handle)
    return {
        "per_process": used_by(rows, server.proc.pid),
        "pid_listed": any(r.get("pid") == server.proc.pid for r in rows),
        "device": mem_both(nv, handle),
        "processes": rows,
    }


def compare(estimate: dict, parsed: dict, ready: dict, after: dict) -> dict:
    est = estimate["estimate"]
    dev = parsed["cuda_device_mib"]
    out = {
        "estimate_mib": {k: round(est[k] / MIB, 2) for k in ("weights", "kv_cache", "compute", "overhead", "total")},
        "llama_cuda_mib": {
            "model": dev["model"],
            "KV": dev["KV"],
            "compute": dev["compute"],
            "output": dev["output"],
            "sum": parsed["cuda_device_total_mib"],
        },
    }
    for when, reading in (("ready", ready), ("after_prompt", after)):
        used = reading.get("per_process") if isinstance(reading, dict) else None
        if used is not None:
            out[f"nvml_{when}_mib"] = round(used / MIB, 2)
            out[f"nvml_{when}_minus_buffers_mib"] = round(used / MIB - parsed["cuda_device_total_mib"], 2)
            out[f"estimate_total_minus_nvml_{when}_mib"] = round(est["total"] / MIB - used / MIB, 2)
    out["weights_minus_model_buffer_mib"] = round(est["weights"] / MIB - dev["model"], 2)
    out["kv_minus_kv_buffer_mib"] = round(est["kv_cache"] / MIB - dev["KV"], 2)
    out["compute_minus_compute_buffer_mib"] = round(est["compute"] / MIB - dev["compute"], 2)
    return out


def live_estimate(
    report: Report, label: str, model_path: Path, context: int, carried: dict | None, same_file: bool
) -> dict:
    """The estimate prepare.sh recorded when the model file is the same (same sha256); else recomputed here."""
    if carried and same_file:
        return {**carried, "source": "prepare.sh (same file, same code)"}
    try:
        value = estimate_for(model_path, context)
        if carried and carried.get("estimate") != value["estimate"]:
            value["differs_from_carried"] = carried.get("estimate")
        value["source"] = "computed on this machine"
        return value
    except Exception as exc:  # noqa: BLE001
        if carried:
            report.error(f"estimate {label}", f"live estimate failed ({type(exc).__name__}: {exc}); using carried")
            return {**carried, "source": "carried from prepare.sh"}
        raise


# ---------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    cycles = sub.add_parser("nvml-cycles", help="(internal) time NVML init/shutdown cycles")
    cycles.add_argument("--count", type=int, default=NVML_CYCLES)
    planner = sub.add_parser("plan", help="(prepare.sh) write the models here, record sha256 and estimate()")
    planner.add_argument("--expected", type=Path, default=EXPECTED)
    planner.add_argument("--workdir", type=Path, required=True)
    planner.add_argument("--tied", choices=("auto", "yes", "no"), default="auto")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/gpu-check-out"))
    parser.add_argument("--budget", type=float, default=510.0, help="seconds after which no new step starts")
    parser.add_argument("--dry-run", action="store_true", help="no GPU steps: exercise models, estimates, report")
    parser.add_argument(
        "--server-bin",
        type=Path,
        help="a llama-server to use instead of building one (a dry run needs one to run the server steps)",
    )
    parser.add_argument("--cpu-server", action="store_true", help="(testing) run the servers with -ngl 0, no --device")
    parser.add_argument("--alloc-bin", type=Path, help="(testing) an alloc program to use instead of building alloc.cu")
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 16)
    parser.add_argument("--cmake-flag", action="append", default=[], help="an extra CMake flag (repeatable)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gpu-check")
    args = parser.parse_args(argv)

    if args.command == "nvml-cycles":
        print(json.dumps(nvml_cycles(args.count)))
        return 0
    if args.command == "plan":
        plan(args.expected, args.workdir, args.tied)
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    report = Report(args.out, args.budget, args.dry_run, argv)
    try:
        body(report, args)
    except BaseException as exc:  # noqa: BLE001
        report.error("main", exc)
        report.data["main_traceback"] = traceback.format_exc()
    finally:
        PROCS.stop_all()
        report.data["finished_at_s"] = round(report.elapsed(), 1)
        write_outputs(report, args)
    return 0


def body(report: Report, args) -> None:
    gpu = not args.dry_run
    data = report.data
    out, work = args.out, args.workdir
    data["machine"] = report.step("machine", lambda: machine_facts(gpu), need_s=1)

    # 2. NVML cycles first, in a fresh process, before this process or any child holds the GPU
    data["nvml_cycles_cold"] = report.step(
        "nvml_cycles_cold", lambda: nvml_cycles_subprocess(NVML_CYCLES, 90), need_s=30, gpu=True
    )

    # 3. the build runs in the background from here on
    build = Build(report, work / "llama-build", out / "build.log", args.jobs, args.cmake_flag)
    if args.server_bin:
        build.result = {"state": f"skipped: --server-bin {args.server_bin}"}
        build.done.set()
    elif gpu:
        report.step("build_start", build.start, need_s=120)
        if not build.thread.is_alive() and not build.done.is_set():
            build.result = {"state": f"not started: {step_note(report.data, 'build_start')}"}
    else:
        build.result = {"state": "skipped (dry run: no GPU)"}

    nv = handle = None
    if gpu:

        def open_nvml():
            nonlocal nv, handle
            nv = nvml_module()
            nv.nvmlInit()
            handle = nv.nvmlDeviceGetHandleByIndex(0)
            return nvml_device_facts(nv, handle)

        data["nvml_device"] = report.step("nvml_open", open_nvml, need_s=5)
        if nv is None:
            gpu_ok = False
        else:
            gpu_ok = True
            data["nvml_cycles_while_held"] = report.step(
                "nvml_cycles_while_held", lambda: nvml_cycles_subprocess(NVML_CYCLES, 60), need_s=20
            )
    else:
        gpu_ok = False

    # 4. alloc.cu (the build may be compiling meanwhile: it uses the CPUs, not the GPU)
    alloc_log: list[str] = []
    data["alloc"] = {}
    binary = report.step(
        "alloc_build",
        lambda: {"binary": str(args.alloc_bin), "used": "--alloc-bin"} if args.alloc_bin else alloc_binary(work),
        need_s=20,
        gpu=True,
    )
    if binary and gpu_ok:
        for gib in ALLOC_GIB:
            data["alloc"][str(gib)] = report.step(
                f"alloc_{gib}gib",
                lambda gib=gib: alloc_experiment(nv, handle, binary["binary"], gib, alloc_log),
                need_s=40,
            )
    data["alloc_binary"] = binary
    data["build_state_after_alloc"] = build.result.get("state")

    # 5. models
    carried = None
    try:
        carried = json.loads(EXPECTED.read_text())
    except Exception as exc:  # noqa: BLE001
        report.error("expected.json", f"{EXPECTED} unreadable ({type(exc).__name__}: {exc}): run prepare.sh first")
    data["expected"] = (
        {
            k: carried.get(k)
            for k in ("written_utc", "repo_commit", "tied_embeddings_supported", "tied_mode", "numpy", "gguf")
        }
        if carried
        else None
    )

    def models_step():
        tied_ok = carried["models"]["tied"]["tied_written"] if carried else tied_supported()
        written = {}
        for name, spec in MODELS.items():
            info = write_model(spec, work / f"{name}.gguf", tied_ok)
            want = (carried or {}).get("models", {}).get(name, {})
            info["sha256_matches_prepare"] = (info["sha256"] == want.get("sha256")) if want else None
            info["bytes_match_prepare"] = (info["bytes"] == want.get("bytes")) if want else None
            written[name] = info
        return written

    models = report.step("models", models_step, need_s=30) or {}
    data["models"] = models

    estimates = {}
    for label, model, context in SINGLE_RUNS + PAIR_RUNS:
        if model in models:
            carried_run = (carried or {}).get("runs", {}).get(label)
            estimates[label] = report.step(
                f"estimate_{label}",
                lambda label=label, model=model, context=context, carried_run=carried_run: live_estimate(
                    report,
                    label,
                    Path(models[model]["path"]),
                    context,
                    carried_run,
                    bool(models[model].get("sha256_matches_prepare")),
                ),
                need_s=2,
            )
    data["estimates"] = estimates

    # 6. wait for the build, then the servers
    server_bin = args.server_bin or (None if args.dry_run else build.binary)
    if gpu and not args.server_bin:

        def wait_build():
            last = 0.0
            while not build.done.wait(2):
                if not build.thread.is_alive():
                    break
                if time.monotonic() - last > 30:
                    log(f"build: {ninja_progress(build.log_path)}")
                    last = time.monotonic()
            return build.result

        report.step("build_wait", wait_build, need_s=1)
    data["build"] = build.result
    can_serve = (
        bool(models)
        and server_bin is not None
        and Path(server_bin).is_file()
        and (args.dry_run or args.server_bin or build.result.get("state") == "ok")
    )
    data["servers"] = {}
    server_logs: list[Path] = []
    if not can_serve:
        data["servers_skipped"] = ("no llama-server binary" if models else "no models") + (
            f" (build: {build.result.get('state')})" if gpu else " (dry run without --server-bin)"
        )
    else:
        # GPU flags (-ngl 999 --device CUDA0) on the GPU machine even if NVML failed: then only NVML's figures
        # are missing
        gpu_flags = not args.dry_run and not args.cpu_server
        env = dict(os.environ)
        if (build.cublas or {}).get("ld_library_path"):
            env["LD_LIBRARY_PATH"] = build.cublas["ld_library_path"] + (
                ":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else ""
            )
        port = 18080
        for label, model, context in SINGLE_RUNS:
            port += 1
            log_path = work / f"server-{label}.log"
            server_logs.append(log_path)
            data["servers"][label] = report.step(
                f"server_{label}",
                lambda label=label, model=model, context=context, port=port, log_path=log_path: serve_one(
                    report,
                    nv,
                    handle,
                    [(label, model, context, port, log_path)],
                    server_bin,
                    models,
                    estimates,
                    gpu_flags,
                    args.prompt_tokens,
                    env,
                ),
                need_s=12,
            )
        pair = []
        for label, model, context in PAIR_RUNS:
            port += 1
            pair.append((label, model, context, port, work / f"server-{label}.log"))
        server_logs += [p[4] for p in pair]
        data["servers"]["pair"] = report.step(
            "server_pair",
            lambda: serve_one(
                report, nv, handle, pair, server_bin, models, estimates, gpu_flags, args.prompt_tokens, env
            ),
            need_s=15,
        )

    if nv is not None:
        data["nvml_end"] = report.step(
            "nvml_end", lambda: {"memory": mem_both(nv, handle), "processes": processes(nv, handle)}, need_s=0
        )
        try:
            nv.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass

    # logs into OUT: build.log is already there; alloc, the servers (pair in one file)
    if alloc_log:
        (out / "alloc.log").write_text("\n".join(alloc_log) + "\n")
    for path in server_logs[:2]:
        copy_capped(path, out / path.name)
    if len(server_logs) > 2:
        with open(out / "server-pair.log", "w") as f:
            for path in server_logs[2:]:
                f.write(f"===== {path.name}\n")
                f.write(capped_text(path))


def serve_one(
    report: Report,
    nv,
    handle,
    runs,
    binary,
    models,
    estimates,
    gpu_ok: bool,
    prompt_tokens: int,
    env: dict | None = None,
) -> dict:
    """Start every server in ``runs`` at once, measure at readiness and after a long prompt, stop them."""
    servers = []
    result: dict = {}
    baseline = mem_v1(nv, handle)["used"] if nv is not None else None
    if nv is not None:
        result["device_before"] = mem_both(nv, handle)
    try:
        for label, model, context, port, log_path in runs:
            server = Server(label, Path(binary), Path(models[model]["path"]), context, port, log_path, gpu_ok, env)
            server.start()
            servers.append(server)
            result[label] = {
                "command": " ".join(server.args),
                "model": model,
                "context": context,
                "pid": server.proc.pid,
            }
        for server in servers:
            result[server.label]["ready_s"] = round(server.wait_ready(max(5.0, min(120.0, report.hard_left() - 20))), 2)
        time.sleep(1.0)  # what the daemon would read on its next tick
        for server in servers:
            result[server.label]["at_ready"] = server_memory(nv, handle, server)
        for server, (label, model, context, port, log_path) in zip(servers, runs):
            vocab = (estimates.get(label) or {}).get("facts", {}).get("vocab_size") or 300
            try:
                result[label]["prompt"] = server.prompt(
                    min(prompt_tokens, context - 2 * N_PREDICT), vocab, max(5.0, min(120.0, report.hard_left() - 15))
                )
            except Exception as exc:  # noqa: BLE001
                result[label]["prompt_error"] = f"{type(exc).__name__}: {exc}"
                report.error(f"prompt {label}", exc)
        time.sleep(0.5)
        for server in servers:
            result[server.label]["after_prompt"] = server_memory(nv, handle, server)
        if nv is not None:
            result["device_after_prompts"] = mem_both(nv, handle)
    finally:
        for server in servers:
            entry = result.setdefault(server.label, {})
            entry["log"] = parse_server_log(server.log_text())
            if nv is not None and server.proc.poll() is None:
                try:  # SIGTERM, as docker stop sends it: when do the PID and the memory leave?
                    entry["release"] = time_release(
                        nv,
                        handle,
                        server.proc,
                        baseline if len(servers) == 1 else None,
                        sig=signal.SIGTERM,
                        timeout=max(2.0, min(20.0, report.hard_left() - 5)),
                    )
                except Exception as exc:  # noqa: BLE001
                    entry["release"] = {"error": f"{type(exc).__name__}: {exc}"}
            server.stop()
            entry["exit_code"] = server.proc.returncode
    for server in servers:
        entry = result[server.label]
        est = estimates.get(server.label)
        if est and "at_ready" in entry:
            entry["comparison"] = compare(est, entry["log"], entry["at_ready"], entry.get("after_prompt", {}))
    if len(servers) > 1 and nv is not None:
        result["sum_per_process_at_ready"] = sum(
            result[s.label]["at_ready"].get("per_process") or 0 for s in servers if "at_ready" in result[s.label]
        )
        result["sum_estimates"] = sum(
            (estimates.get(s.label) or {}).get("estimate", {}).get("total", 0) for s in servers
        )
    if nv is not None:
        time.sleep(0.5)
        result["device_after_stop"] = mem_both(nv, handle)
    return result


LOG_CAP = 6 * MIB


def capped_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return f"(unreadable: {exc})\n"
    if len(raw) > LOG_CAP:
        half = LOG_CAP // 2
        raw = raw[:half] + f"\n... [{len(raw) - LOG_CAP} bytes cut] ...\n".encode() + raw[-half:]
    return raw.decode(errors="replace")


def copy_capped(src: Path, dst: Path) -> None:
    dst.write_text(capped_text(src))


# ---------------------------------------------------------------- writing the report


def mib(value) -> str:
    return "—" if value is None else f"{value / MIB:,.1f}"


def write_outputs(report: Report, args) -> None:
    out = args.out
    try:
        (out / "gpu.json").write_text(json.dumps(report.data, indent=1, default=str) + "\n")
    except Exception as exc:  # noqa: BLE001
        log(f"cannot write gpu.json: {exc}")
    try:
        text = render(report.data)
    except Exception:  # noqa: BLE001
        text = "# GPU check\n\nThe report could not be rendered:\n\n```\n" + traceback.format_exc() + "```\n"
    (out / "gpu.md").write_text(text)
    build_log = out / "build.log"
    if build_log.is_file() and build_log.stat().st_size > LOG_CAP:
        copy_capped(build_log, build_log.with_suffix(".tmp"))
        build_log.with_suffix(".tmp").replace(build_log)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    log(f"wrote {out}: {', '.join(files)}")
    if len(files) + (0 if "check.log" in files else 1) > 8:
        log("WARNING: more than 8 files in OUT; only 8 come back")


def render(d: dict) -> str:
    lines: list[str] = []
    add = lines.append
    machine = d.get("machine") or {}
    device = d.get("nvml_device") or {}
    add("# GPU check (issue 11, item 8)")
    add("")
    if d.get("dry_run"):
        add(
            "**Dry run: no GPU was used.** The GPU steps were skipped; this report only shows that the script's "
            "model, estimate and report code works."
        )
        add("")
    add(
        f"Started {d.get('started_utc')} UTC; finished after {d.get('finished_at_s')} s "
        f"(budget for starting steps: {d.get('budget_s')} s)."
    )
    add("")
    add("Command (one device `run` call, after `bash bench/gpu/prepare.sh` on the CPU machine):")
    add("")
    add("```")
    add(d.get("command", ""))
    add("```")
    add("")
    add("## Machine")
    add("")
    for key in (
        "name",
        "uuid",
        "driver",
        "cuda_driver_version",
        "nvml_version",
        "persistence_mode",
        "compute_mode",
        "mig_mode",
        "device_count",
    ):
        if key in device:
            add(f"- {key}: `{device[key]}`")
    for key in ("hostname", "platform", "python", "cpus", "mem_total_kib", "nvidia_ml_py"):
        if key in machine:
            add(f"- {key}: `{machine[key]}`")
    for key, pick in (("nvcc", -1), ("cmake", 0), ("ninja", 0)):
        if machine.get(key):
            add(f"- {key}: `{machine[key].splitlines()[pick]}`")
    if machine.get("nvidia_smi_q"):
        add("")
        add("`nvidia-smi -q` (header):")
        add("")
        add("```")
        add(machine["nvidia_smi_q"])
        add("```")
    add("")

    add("## 1. NVML memory and the per-process CUDA overhead (alloc.cu, plain cudaMalloc)")
    add("")
    allocs = {k: v for k, v in (d.get("alloc") or {}).items() if v}
    if not allocs:
        step = "alloc_build" if "alloc_0gib" not in d.get("steps", {}) else "alloc_0gib"
        add(f"Not run: {step_note(d, step)}")
    else:
        add(
            "| N GiB | NVML per-process MiB | overhead MiB (per-process − N GiB) | NVML PID = launched PID | "
            "v1 used Δ MiB | v2 used Δ MiB | cudaMemGetInfo free drop MiB | process exit s | PID gone from NVML s "
            "| memory back s |"
        )
        add("|---|---|---|---|---|---|---|---|---|---|")
        for gib, r in allocs.items():
            rel = r.get("release") or {}
            add(
                f"| {gib} | {mib(r.get('nvml_used_by_process'))} | {mib(r.get('overhead_bytes'))} | "
                f"{r.get('nvml_pid_equals_launched_pid')} (new NVML PIDs {r.get('nvml_pids_new')}, launched "
                f"{r.get('launched_pid')}) | {mib(r.get('device_used_delta_v1'))} | "
                f"{mib(r.get('device_used_delta_v2'))} "
                f"| {mib(r.get('cuda_free_drop'))} | {rel.get('process_exited_s')} | {rel.get('pid_left_nvml_s')} "
                f"| {rel.get('memory_back_s')} |"
            )
        add("")
        add("Device memory before and after each allocation (MiB):")
        add("")
        add("| N GiB | when | v1 total | v1 used | v1 free | v2 total | v2 reserved | v2 used | v2 free |")
        add("|---|---|---|---|---|---|---|---|---|")
        for gib, r in allocs.items():
            for when in ("before", "after"):
                m = r.get(when) or {}
                v1, v2 = m.get("v1") or {}, m.get("v2") or {}
                add(
                    f"| {gib} | {when} | {mib(v1.get('total'))} | {mib(v1.get('used'))} | {mib(v1.get('free'))} | "
                    f"{mib(v2.get('total'))} | {mib(v2.get('reserved'))} | {mib(v2.get('used'))} | "
                    f"{mib(v2.get('free'))} |"
                )
        add("")
        add(
            "Release is timed from SIGKILL, polling NVML every 50 ms; 'memory back' means v1 used within 16 MiB "
            "of the figure before the allocation. The build was compiling on the CPUs meanwhile."
        )
    add("")

    add("## 2. NVML init/shutdown cycles against one kept session")
    add("")
    for key, title in (
        ("nvml_cycles_cold", "no other NVML/CUDA client on the GPU"),
        ("nvml_cycles_while_held", "while this script held an NVML session"),
    ):
        c = d.get(key)
        if not c:
            add(f"- {title}: not run ({step_note(d, key)})")
            continue
        a, b, f = c["init_read_shutdown"], c["read_v1_on_kept_session"], c["read_v1_v2_processes_on_kept_session"]
        add(
            f"- {title}: {a['n']} × (nvmlInit + handle + memory info + nvmlShutdown) took {a['total_ms']:.1f} ms "
            f"(median {a['median_ms']:.3f} ms, max {a['max_ms']:.3f}); {b['n']} memory reads on one session took "
            f"{b['total_ms']:.2f} ms (median {b['median_ms']:.4f} ms); with v2 and the process list "
            f"{f['total_ms']:.2f} ms; ratio per read {a['median_ms'] / max(b['median_ms'], 1e-9):.0f}×."
        )
    add("")

    add("## 3. Building llama-server with CUDA")
    add("")
    b = d.get("build") or {}
    add(f"- state: {b.get('state')}" + (f" — {b.get('error')}" if b.get("error") else ""))
    for key in ("configure_s", "build_s", "total_s", "binary_bytes"):
        if key in b:
            add(f"- {key}: {b[key]}")
    if b.get("configure"):
        add(f"- configure: `{' '.join(b['configure'])}`")
        add(f"- build: `{' '.join(b['build'])}`")
    add("")

    add("## 4. Models and localllm's estimate()")
    add("")
    exp = d.get("expected") or {}
    add(
        f"Estimates recorded by prepare.sh at repo commit `{exp.get('repo_commit')}` on {exp.get('written_utc')}; "
        f"tinygguf tied_embeddings supported then: {exp.get('tied_embeddings_supported')}."
    )
    add("")
    models = d.get("models") or {}
    if models:
        add("| model | shape | tied head | file MiB | written s | same sha256 as prepare.sh |")
        add("|---|---|---|---|---|---|")
        for name, m in models.items():
            spec = MODELS.get(name, {})
            shape = (
                f"embd {spec.get('embedding')}, {spec.get('blocks')} blocks, vocab +{spec.get('extra_vocab')}, "
                f"ctx {spec.get('context')}"
            )
            add(
                f"| {name} | {shape} | {m.get('tied_written')} | {mib(m.get('bytes'))} | {m.get('written_s')} | "
                f"{m.get('sha256_matches_prepare')} |"
            )
    else:
        add(f"Models not written: {step_note(d, 'models')}")
    add("")
    ests = {k: v for k, v in (d.get("estimates") or {}).items() if v}
    if ests:
        parts = []  # every byte figure estimate() gives, in its order (the estimator's fields may grow)
        for e in ests.values():
            parts += [
                k
                for k, v in e["estimate"].items()
                if isinstance(v, int) and not k.endswith("layers") and k not in parts
            ]
        add("| run | -c | " + " | ".join(f"{p} MiB" for p in parts) + " | source |")
        add("|---|---|" + "---|" * len(parts) + "---|")
        for label, e in ests.items():
            x = e["estimate"]
            add(f"| {label} | {e['context']} | " + " | ".join(mib(x.get(p)) for p in parts) + f" | {e.get('source')} |")
        launch = next(iter(ests.values())).get("launch")
        add("")
        add(f"LaunchSettings: `{launch}` (context per run as above).")
    add("")

    add("## 5. llama-server on the GPU: buffers and NVML against estimate()")
    add("")
    servers = d.get("servers") or {}
    if d.get("servers_skipped"):
        add(f"Not run: {d['servers_skipped']}.")
    rows = []
    for group in servers.values():
        if not group:
            continue
        for label, entry in group.items():
            if isinstance(entry, dict) and "command" in entry:
                rows.append((label, entry))
    if rows:
        add(
            "| run | est weights / CUDA model | est KV / CUDA KV | est compute / CUDA compute | CUDA output | "
            "est total | NVML at ready | NVML after prompt | NVML − CUDA buffers (ready / after) | offloaded | "
            "host buffers |"
        )
        add("|---|---|---|---|---|---|---|---|---|---|---|")
        for label, e in rows:
            c = e.get("comparison") or {}
            em, lm = c.get("estimate_mib", {}), c.get("llama_cuda_mib", {})
            log_ = e.get("log") or {}
            add(
                f"| {label} | {em.get('weights')} / {lm.get('model')} | {em.get('kv_cache')} / {lm.get('KV')} | "
                f"{em.get('compute')} / {lm.get('compute')} | {lm.get('output')} | {em.get('total')} | "
                f"{c.get('nvml_ready_mib')} | {c.get('nvml_after_prompt_mib')} | "
                f"{c.get('nvml_ready_minus_buffers_mib')} / {c.get('nvml_after_prompt_minus_buffers_mib')} | "
                f"{log_.get('offloaded')} | "
                + "; ".join(f"{k} {v:g}" for k, v in (log_.get("host_buffers_mib") or {}).items())
                + " |"
            )
        add("")
        add("All figures in MiB. 'NVML' is nvmlDeviceGetComputeRunningProcesses' usedGpuMemory for the server's PID.")
        add("")
        for label, e in rows:
            add(f"### {label}")
            add("")
            add(f"- command: `{e.get('command')}`")
            for key in ("ready_s", "exit_code", "prompt", "prompt_error", "release"):
                if key in e:
                    add(f"- {key}: {e[key]}")
            for when in ("at_ready", "after_prompt"):
                m = e.get(when) or {}
                if "pid_listed" in m:
                    add(
                        f"- {when}: PID listed by NVML: {m['pid_listed']}; per-process {mib(m.get('per_process'))} "
                        f"MiB; device v1 used {mib(m['device']['v1'].get('used'))} MiB"
                    )
            buffers = (e.get("log") or {}).get("buffer_lines") or []
            if buffers:
                add("- buffer lines:")
                add("")
                add("```")
                lines.extend(buffers)
                add("```")
            add("")
        pair = servers.get("pair") or {}
        if "sum_per_process_at_ready" in pair:
            add(
                f"Two servers at once: NVML per-process sum at ready {mib(pair['sum_per_process_at_ready'])} MiB, "
                f"sum of estimates {mib(pair['sum_estimates'])} MiB."
            )
            add("")

    add("## Steps")
    add("")
    add("| step | ok | started at s | seconds | note |")
    add("|---|---|---|---|---|")
    for name, s in d.get("steps", {}).items():
        note = s.get("skipped") or s.get("error") or ""
        add(f"| {name} | {s.get('ok')} | {s.get('started_at_s')} | {s.get('seconds', '')} | {note[:200]} |")
    add("")
    errors = d.get("errors") or []
    add("## Errors")
    add("")
    if errors:
        for e in errors:
            add(f"- at {e['at_s']} s, {e['where']}: {e['error'][:500]}")
    else:
        add("None.")
    add("")
    add("Raw numbers: gpu.json. Logs: build.log, alloc.log, server-*.log, check.log.")
    return "\n".join(lines) + "\n"


def step_note(d: dict, name: str) -> str:
    s = (d.get("steps") or {}).get(name) or {}
    if not s and d.get("dry_run"):
        return "dry run: no GPU"
    return s.get("skipped") or s.get("error") or ("not reached" if not s else "no result")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
