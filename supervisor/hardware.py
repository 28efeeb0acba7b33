"""Detecting the host: CPU and RAM through psutil, GPUs through NVML or nvidia-smi.

Parsing is split from running, as in llama-swap: ``parse_nvidia_smi`` is a
pure function tested on recorded output; ``detect_host`` does the I/O and
falls back cleanly when no GPU, driver or tool is present.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from dataclasses import dataclass

import psutil

from .profiles import GIB, HostFacts, Profile, closest_profile, load_profiles

MIB = 1024**2
NVIDIA_SMI_QUERY = [
    "nvidia-smi",
    "--query-gpu=index,name,memory.total,memory.used,memory.free",
    "--format=csv,noheader,nounits",
]


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    uuid: str = ""  # "GPU-..." from NVML or nvidia-smi; "" when unknown
    reserved_bytes: int = 0  # driver-reserved memory (NVML memory info v2); 0 when unknown
    problem: str | None = None  # the device cannot be used, and why (its memory fields are then 0)


def parse_nvidia_smi(text: str) -> list[GpuReading]:
    """Parse ``nvidia-smi`` CSV (see NVIDIA_SMI_QUERY); values are MiB."""
    readings = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        fields = [f.strip() for f in raw.split(",")]
        if len(fields) != 5:
            raise ValueError(f"unexpected nvidia-smi line: {raw!r}")
        index, name, total, used, free = fields
        readings.append(
            GpuReading(int(index), name, int(float(total)) * MIB, int(float(used)) * MIB, int(float(free)) * MIB)
        )
    return readings


@contextlib.contextmanager
def _nvml():
    """The initialized ``pynvml`` module, or None when NVML is not usable here."""
    try:
        import pynvml
    except ImportError:
        yield None
        return
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        yield None
        return
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def read_gpus_nvml() -> list[GpuReading] | None:
    """GPU memory through NVML, or None when NVML is not usable here."""
    with _nvml() as nvml:
        if nvml is None:
            return None
        readings = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            readings.append(GpuReading(index, str(nvml.nvmlDeviceGetName(handle)), memory.total, memory.used,
                                       memory.free))
        return readings


def read_gpus_nvidia_smi() -> list[GpuReading] | None:
    """GPU memory through the ``nvidia-smi`` tool, or None when it is absent or fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(NVIDIA_SMI_QUERY, capture_output=True, text=True, timeout=10, check=True)
        return parse_nvidia_smi(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def facts_from(readings: list[GpuReading] | None, source: str, ram_bytes: int, cpu_cores: int) -> HostFacts:
    """Pure: turn readings into the facts profile selection works on."""
    gpus = tuple(r.total_bytes / GIB for r in readings or [])
    return HostFacts(gpu_vram_gib=gpus, ram_gib=ram_bytes / GIB, cpu_cores=cpu_cores,
                     gpu_source=source if gpus else "none")


def detect_host() -> HostFacts:
    readings, source = read_gpus_nvml(), "nvml"
    if readings is None:
        readings, source = read_gpus_nvidia_smi(), "nvidia-smi"
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    return facts_from(readings, source, psutil.virtual_memory().total, cores)


def memory_of(processes: list[tuple[int, int]], pids: set[int]) -> int:
    """Pure: bytes used by ``pids`` among NVML's (pid, used bytes) compute processes."""
    return sum(used for pid, used in processes if pid in pids)


def read_gpu_processes() -> list[tuple[int, int]] | None:
    """(pid, used bytes) of every compute process on every GPU, or None without NVML."""
    with _nvml() as nvml:
        if nvml is None:
            return None
        found = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                found.append((int(process.pid), int(process.usedGpuMemory or 0)))
        return found


def select_profile(name: str, profiles_dir=None) -> tuple[Profile, str]:
    """The profile a config names, or for ``auto`` the one closest to this host; with the reason."""
    profiles = load_profiles(profiles_dir)
    if name == "auto":
        return closest_profile(detect_host(), profiles)
    return profiles[name], f"named in the config: '{name}'"
