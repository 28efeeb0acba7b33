"""Detecting the host: CPU and RAM through psutil, GPUs through NVML (``nvml.Nvml``) or nvidia-smi.

Parsing is split from running, as in llama-swap: ``parse_nvidia_smi`` is a
pure function tested on recorded output; ``detect_host`` does the I/O and
falls back cleanly when no GPU, driver or tool is present.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import TYPE_CHECKING

import psutil

from supervisor.config.profiles import GIB, HostFacts, Profile, closest_profile, load_profiles
from supervisor.core.placement import GpuReading

if TYPE_CHECKING:
    from supervisor.runtime.nvml import Nvml  # nvml.py imports this module: only for the annotation

MIB = 1024**2
NVIDIA_SMI_FIELDS = ("index", "uuid", "name", "memory.total", "memory.used", "memory.free", "memory.reserved")
# nvidia-smi before memory.reserved existed (drivers before NVML's memory info v2) refuses the whole query.
NVIDIA_SMI_FIELDS_LEGACY = NVIDIA_SMI_FIELDS[:-1]


def nvidia_smi_query(fields: tuple[str, ...] = NVIDIA_SMI_FIELDS) -> list[str]:
    return ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]


NVIDIA_SMI_QUERY = nvidia_smi_query()


def parse_nvidia_smi(text: str, fields: tuple[str, ...] = NVIDIA_SMI_FIELDS) -> list[GpuReading]:
    """Parse ``nvidia-smi`` CSV of ``fields`` (see NVIDIA_SMI_QUERY); memory values are MiB.

    nvidia-smi writes a value it could not read as ``[N/A]``, ``[Not Supported]``,
    ``[Unknown Error]``, ``[GPU is lost]``...: that GPU is returned with ``problem``
    naming the field and zero memory, so one bad GPU does not hide the others.
    A line that is not CSV of the right width raises ValueError.
    """
    readings = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        values = [f.strip() for f in raw.split(",")]
        if len(values) != len(fields):
            raise ValueError(f"unexpected nvidia-smi line: {raw!r}")
        readings.append(_reading_from(dict(zip(fields, values, strict=True)), raw))
    return readings


def _unreadable(value: str) -> bool:
    return value.startswith("[") and value.endswith("]")


def _reading_from(row: dict[str, str], raw: str) -> GpuReading:
    try:
        index = int(row["index"])
    except ValueError:
        raise ValueError(f"unexpected nvidia-smi line: {raw!r}") from None
    uuid, name = row.get("uuid", ""), row["name"]
    # Reserved memory is extra detail (NVML v1 has none either): not knowing it leaves the GPU usable.
    reserved = row.get("memory.reserved", "0")
    row = {**row, "memory.reserved": "0" if _unreadable(reserved) else reserved}
    unreadable = [f"{field} is {value}" for field, value in row.items() if _unreadable(value)]
    if unreadable:
        return GpuReading(
            index,
            "" if _unreadable(name) else name,
            0,
            0,
            0,
            "" if _unreadable(uuid) else uuid,
            problem="nvidia-smi could not read it: " + ", ".join(unreadable),
        )
    try:
        total, used, free, reserved_mib = (
            int(float(row[f])) for f in ("memory.total", "memory.used", "memory.free", "memory.reserved")
        )
    except ValueError:
        raise ValueError(f"unexpected nvidia-smi line: {raw!r}") from None
    return GpuReading(index, name, total * MIB, used * MIB, free * MIB, uuid, reserved_mib * MIB)


def read_gpus_nvml() -> list[GpuReading] | None:
    """GPU memory through a one-shot NVML session, or None when NVML is not usable here.

    For callers that read once; the daemon keeps one ``Nvml`` for its life instead.
    """
    from supervisor.runtime.nvml import Nvml

    nvml = Nvml.open()
    if nvml is None:
        return None
    with nvml:
        return nvml.read()


def read_gpus_nvidia_smi() -> list[GpuReading] | None:
    """GPU memory through the ``nvidia-smi`` tool, or None when it is absent or fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    for fields in (NVIDIA_SMI_FIELDS, NVIDIA_SMI_FIELDS_LEGACY):
        try:
            done = subprocess.run(nvidia_smi_query(fields), capture_output=True, text=True, timeout=10, check=True)
            return parse_nvidia_smi(done.stdout, fields)
        except subprocess.CalledProcessError:
            continue  # an older nvidia-smi rejects memory.reserved: ask again without it
        except (OSError, subprocess.SubprocessError, ValueError):
            return None
    return None


def facts_from(readings: list[GpuReading] | None, source: str, ram_bytes: int, cpu_cores: int) -> HostFacts:
    """Pure: turn readings into the facts profile selection works on; unusable GPUs are named, not counted."""
    readings = readings or []
    gpus = tuple(r.total_bytes / GIB for r in readings if r.problem is None)
    unusable = tuple(
        f"GPU {r.index}{f' ({r.uuid})' if r.uuid else ''}: {r.problem}" for r in readings if r.problem is not None
    )
    return HostFacts(
        gpu_vram_gib=gpus,
        ram_gib=ram_bytes / GIB,
        cpu_cores=cpu_cores,
        gpu_source=source if readings else "none",
        unusable_gpus=unusable,
    )


def detect_host(nvml: Nvml | None = None) -> HostFacts:
    """This machine's facts; ``nvml`` is the caller's session, else a one-shot one is opened."""
    if nvml is not None:
        readings, source = nvml.read(), "nvml"
    else:
        readings, source = read_gpus_nvml(), "nvml"
    if readings is None:
        readings, source = read_gpus_nvidia_smi(), "nvidia-smi"
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    return facts_from(readings, source, psutil.virtual_memory().total, cores)


def select_profile(name: str, profiles_dir=None, nvml: Nvml | None = None) -> tuple[Profile, str]:
    """The profile a config names, or for ``auto`` the one closest to this host; with the reason."""
    profiles = load_profiles(profiles_dir)
    if name == "auto":
        return closest_profile(detect_host(nvml), profiles)
    return profiles[name], f"named in the config: '{name}'"
