"""One NVML session for the daemon's life: GPU memory per device, and the compute processes on each.

NVML is initialised once and its device handles are kept: on hosts without
persistence mode every ``nvmlInit`` re-initialises the GPUs, and the daemon
reads every second (four times a second while it waits for memory to come
back). Every per-device error stays with its device: one GPU that fell off the
bus, or answers NOT_SUPPORTED (GB10 / DGX Spark), is reported with its reason
while the others keep working, and nothing here raises ``NVMLError``.

The ``pynvml`` module (the nvidia-ml-py package) is injectable, so the error
paths are tested with a fake in place of a GPU.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from supervisor.core.placement import GpuReading

MIG_PROBLEM = "MIG mode is enabled; localllm does not support MIG yet"


@dataclass(frozen=True)
class GpuProcess:
    """A compute process on one GPU; a process on two GPUs appears once for each."""

    pid: int  # as NVML reports it: the host's PID namespace
    used_bytes: int  # 0 where NVML cannot say (it reports None then)
    gpu_index: int
    gpu_uuid: str  # "" when NVML did not give it


class _QueryFailed(Exception):
    """A device query failed; ``problem`` says which one and with what NVML error."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


class Nvml:
    """One NVML session for the daemon's life: initialised once, device handles kept (no init/shutdown per read)."""

    def __init__(self, module: Any, count: int):
        # Inert: ``open`` does the initialising; this only holds the session's state.
        self._nvml = module
        self._count = count
        self._lock = threading.Lock()  # the daemon reads from worker threads (asyncio.to_thread)
        self._handles: list[Any] = [None] * count  # None: not fetched yet, or dropped after a failure
        self._uuids: list[str] = [""] * count
        self._memory_v2 = hasattr(module, "nvmlMemory_v2")  # False once the driver shows it lacks v2
        self._processes_v2 = False  # True once the driver shows it lacks the v3 process list
        self._error_names = {getattr(module, name): name for name in dir(module) if name.startswith("NVML_ERROR_")}
        self._closed = False

    @classmethod
    def open(cls, module: Any = None) -> Nvml | None:
        """A session, or None when NVML is not usable here (no pynvml, no driver, no GPU)."""
        if module is None:
            try:
                import pynvml as module
            except ImportError:
                return None
        try:
            module.nvmlInit()
        except module.NVMLError:
            return None
        try:
            count = int(module.nvmlDeviceGetCount())
        except module.NVMLError:
            _shutdown(module)
            return None
        return cls(module, count)

    def __enter__(self) -> Nvml:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def read(self) -> list[GpuReading]:
        """Memory of every device; a device whose query fails has ``problem`` set and zero memory.

        Every device is queried again on every read, so one that failed (a GPU
        being reset, say) is seen again once it answers.
        """
        with self._lock:
            if self._closed:
                return []
            return [self._read_device(index) for index in range(self._count)]

    def processes(self) -> list[GpuProcess]:
        """The compute processes on every device that answers; a device whose query fails is skipped."""
        with self._lock:
            if self._closed:
                return []
            found: list[GpuProcess] = []
            for index in range(self._count):
                try:
                    handle = self._handle(index)
                    uuid = self._uuid(index, handle)
                    listed = self._compute_processes(index, handle)
                except _QueryFailed:
                    continue
                found += [GpuProcess(int(p.pid), int(p.usedGpuMemory or 0), index, uuid) for p in listed]
            return found

    def close(self) -> None:
        """End the session (``nvmlShutdown`` once); later reads return nothing."""
        with self._lock:
            if not self._closed:
                self._closed = True
                _shutdown(self._nvml)

    # -- one device, under the lock

    def _read_device(self, index: int) -> GpuReading:
        name = uuid = ""
        try:
            handle = self._handle(index)
            name = self._query(index, "name", self._nvml.nvmlDeviceGetName, handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            uuid = self._uuid(index, handle)
            if self._mig_enabled(handle):
                # The parent's memory is not what a MIG instance can use; addressing instances is not built yet.
                return GpuReading(index, name, 0, 0, 0, uuid, problem=MIG_PROBLEM)
            total, used, free, reserved = self._memory(index, handle)
        except _QueryFailed as failed:
            return GpuReading(index, name, 0, 0, 0, uuid, problem=failed.problem)
        return GpuReading(index, name, total, used, free, uuid, reserved)

    def _handle(self, index: int) -> Any:
        if self._handles[index] is None:
            self._handles[index] = self._query(index, "device handle", self._nvml.nvmlDeviceGetHandleByIndex, index)
        return self._handles[index]

    def _uuid(self, index: int, handle: Any) -> str:
        # A device's UUID does not change while its handle is valid, so it is asked for once per handle.
        if not self._uuids[index]:
            uuid = self._query(index, "UUID", self._nvml.nvmlDeviceGetUUID, handle)
            self._uuids[index] = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        return self._uuids[index]

    def _mig_enabled(self, handle: Any) -> bool:
        try:
            current, _pending = self._nvml.nvmlDeviceGetMigMode(handle)
        except self._nvml.NVMLError:
            # NOT_SUPPORTED on every GPU without MIG (all consumer cards), FUNCTION_NOT_FOUND on old drivers:
            # no MIG. A GPU that is really failing fails its memory query next, and is reported there.
            return False
        return current == getattr(self._nvml, "NVML_DEVICE_MIG_ENABLE", 1)

    def _memory(self, index: int, handle: Any) -> tuple[int, int, int, int]:
        """(total, used, free, reserved): v2 where the driver has it, since v1 counts reserved memory as used."""
        nvml = self._nvml
        if self._memory_v2:
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
                return int(memory.total), int(memory.used), int(memory.free), int(memory.reserved)
            except nvml.NVMLError as error:
                if error.value in (
                    getattr(nvml, "NVML_ERROR_FUNCTION_NOT_FOUND", None),
                    getattr(nvml, "NVML_ERROR_ARGUMENT_VERSION_MISMATCH", None),
                ):
                    self._memory_v2 = False  # the driver predates v2: no use asking again
                # Otherwise v1 may still answer for this device; if it fails too, its error is the one reported.
        memory = self._query(index, "memory info", nvml.nvmlDeviceGetMemoryInfo, handle)
        return int(memory.total), int(memory.used), int(memory.free), 0

    def _compute_processes(self, index: int, handle: Any) -> list:
        nvml = self._nvml
        if not self._processes_v2:
            try:
                return self._query(index, "compute processes", nvml.nvmlDeviceGetComputeRunningProcesses, handle)
            except getattr(nvml, "NVMLLibraryMismatchError", ()):
                # nvidia-ml-py 12+ asks for the v3 list, which drivers before R510 lack; it then raises this
                # instead of NVMLError, and the v2 list is the one that works there.
                if not hasattr(nvml, "nvmlDeviceGetComputeRunningProcesses_v2"):
                    raise _QueryFailed("compute processes failed: NVML library mismatch") from None
                self._processes_v2 = True
        return self._query(index, "compute processes", nvml.nvmlDeviceGetComputeRunningProcesses_v2, handle)

    def _query(self, index: int, what: str, function, *args):
        try:
            return function(*args)
        except self._nvml.NVMLError as error:
            # Drop the handle: a GPU that was lost or reset needs a new one, and fetching one is cheap.
            self._handles[index] = None
            self._uuids[index] = ""
            raise _QueryFailed(f"{what} failed: {self._error_name(error)}") from error

    def _error_name(self, error: Exception) -> str:
        value = getattr(error, "value", None)
        return self._error_names.get(value, f"NVML error {value}")


def _shutdown(module: Any) -> None:
    try:
        module.nvmlShutdown()
    except module.NVMLError:
        pass  # nothing to do about a failed shutdown: the process is done with NVML either way
