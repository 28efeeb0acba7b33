"""A fake of the ``pynvml`` module (nvidia-ml-py) for tests on machines without a GPU.

Same function names, signatures, error class and constants as the real module
(``test_nvml.test_fake_matches_the_real_pynvml`` checks them); each device can be
told to fail a query with an NVML error.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

GIB = 1024**3
MIB = 1024**2


class FakeNvmlError(Exception):
    def __init__(self, value: int):
        super().__init__(value)
        self.value = value


class FakeLibraryMismatchError(Exception):
    """What nvidia-ml-py raises when the driver lacks the v3 process list."""


@dataclass
class FakeDevice:
    name: str = "NVIDIA GeForce RTX 3090"
    uuid: str = "GPU-8e41b0c2-7d3a-4f95-e216-3ac9d05b7f18"
    total: int = 24 * GIB
    used: int = GIB
    reserved: int = 300 * MIB
    mig: int | None = None  # None: NOT_SUPPORTED (no MIG on this GPU); 0 disabled; 1 enabled
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)  # query ("handle", "name", "uuid", "memory", ...) -> error


class FakeNvml:
    """Mimics the parts of ``pynvml`` that supervisor.runtime.nvml uses; counts every call."""

    NVMLError = FakeNvmlError
    NVMLLibraryMismatchError = FakeLibraryMismatchError
    NVML_ERROR_UNINITIALIZED = 1
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NO_PERMISSION = 4
    NVML_ERROR_DRIVER_NOT_LOADED = 9
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_ERROR_FUNCTION_NOT_FOUND = 13
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_ERROR_RESET_REQUIRED = 16
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25
    NVML_ERROR_UNKNOWN = 999
    NVML_DEVICE_MIG_ENABLE = 1
    nvmlMemory_v2 = 0x02000028

    def __init__(
        self,
        *devices: FakeDevice,
        init_error: int | None = None,
        has_v2: bool = True,
        has_v3_processes: bool = True,
        as_bytes: bool = False,
    ):
        self.devices = list(devices)
        self.init_error = init_error
        self.count_error: int | None = None
        self.has_v2 = has_v2
        self.has_v3_processes = has_v3_processes
        self.as_bytes = as_bytes  # old pynvml returned bytes for names and UUIDs
        self.calls: Counter[str] = Counter()
        self.inside = 0
        self.most_inside = 0

    def _enter(self, call: str, handle=None, query: str | None = None) -> FakeDevice | None:
        self.calls[call] += 1
        if handle is None:
            return None
        device = self.devices[handle[1]]
        if query in device.fail:
            raise FakeNvmlError(device.fail[query])
        return device

    def _text(self, value: str):
        return value.encode() if self.as_bytes else value

    def nvmlInit(self):
        self.calls["nvmlInit"] += 1
        if self.init_error is not None:
            raise FakeNvmlError(self.init_error)

    def nvmlShutdown(self):
        self.calls["nvmlShutdown"] += 1

    def nvmlDeviceGetCount(self):
        self.calls["nvmlDeviceGetCount"] += 1
        if self.count_error is not None:
            raise FakeNvmlError(self.count_error)
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        self.calls["nvmlDeviceGetHandleByIndex"] += 1
        if "handle" in self.devices[index].fail:
            raise FakeNvmlError(self.devices[index].fail["handle"])
        return ("handle", index)

    def nvmlDeviceGetName(self, handle):
        return self._text(self._enter("nvmlDeviceGetName", handle, "name").name)

    def nvmlDeviceGetUUID(self, handle):
        return self._text(self._enter("nvmlDeviceGetUUID", handle, "uuid").uuid)

    def nvmlDeviceGetMigMode(self, handle):
        device = self._enter("nvmlDeviceGetMigMode", handle, "mig")
        if device.mig is None:
            raise FakeNvmlError(self.NVML_ERROR_NOT_SUPPORTED)
        return [device.mig, device.mig]

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        if version:
            self.calls["nvmlDeviceGetMemoryInfo_v2"] += 1
            if not self.has_v2:
                raise FakeNvmlError(self.NVML_ERROR_FUNCTION_NOT_FOUND)
        device = self._enter("nvmlDeviceGetMemoryInfo", handle, "memory")
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        time.sleep(0.0005)  # widens the window in which an unguarded second thread would get in
        self.inside -= 1
        free = device.total - device.used - device.reserved
        if version:
            return SimpleNamespace(
                version=version, total=device.total, reserved=device.reserved, free=free, used=device.used
            )
        # v1 counts the reserved memory as used
        return SimpleNamespace(total=device.total, free=free, used=device.used + device.reserved)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        device = self._enter("nvmlDeviceGetComputeRunningProcesses", handle, "processes")
        if not self.has_v3_processes:
            raise FakeLibraryMismatchError("Unversioned function called ...")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in device.processes]

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle):
        device = self._enter("nvmlDeviceGetComputeRunningProcesses_v2", handle, "processes")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in device.processes]
