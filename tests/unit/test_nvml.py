"""supervisor.runtime.nvml: one NVML session, and per-device errors that stay with their device.

There is no GPU on the machines these run on, so a fake stands in for the
``pynvml`` module: the same function names, signatures, error class and
constants (checked against the real module in ``test_fake_matches_the_real_pynvml``).
"""

from __future__ import annotations

import sys
import threading
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.runtime.hardware import GpuReading, read_gpus_nvml
from supervisor.runtime.nvml import MIG_PROBLEM, GpuProcess, Nvml

from .fake_nvml import FakeDevice, FakeNvml, FakeNvmlError

GIB = 1024**3
MIB = 1024**2


UUID0 = "GPU-8e41b0c2-7d3a-4f95-e216-3ac9d05b7f18"
UUID1 = "GPU-f07a3d96-22c8-1be4-5d0f-96e18b4c2a75"


def two_gpus(**fail_on_second) -> FakeNvml:
    return FakeNvml(FakeDevice(uuid=UUID0), FakeDevice(uuid=UUID1, used=5 * GIB, fail=dict(fail_on_second)))


def healthy(index: int, uuid: str, used: int = GIB) -> GpuReading:
    return GpuReading(index, "NVIDIA GeForce RTX 3090", 24 * GIB, used, 24 * GIB - used - 300 * MIB, uuid, 300 * MIB)


def test_fake_matches_the_real_pynvml():
    import pynvml

    for name in [
        "nvmlInit",
        "nvmlShutdown",
        "nvmlDeviceGetCount",
        "nvmlDeviceGetHandleByIndex",
        "nvmlDeviceGetName",
        "nvmlDeviceGetUUID",
        "nvmlDeviceGetMemoryInfo",
        "nvmlDeviceGetMigMode",
        "nvmlDeviceGetComputeRunningProcesses",
        "nvmlDeviceGetComputeRunningProcesses_v2",
        "NVMLLibraryMismatchError",
        "nvmlMemory_v2",
    ]:
        assert hasattr(pynvml, name), name
    for name in dir(FakeNvml):
        if name.startswith("NVML_") or name == "nvmlMemory_v2":
            assert getattr(pynvml, name) == getattr(FakeNvml, name), name
    assert pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST).value == pynvml.NVML_ERROR_GPU_IS_LOST
    assert [f for f, _ in pynvml.c_nvmlMemory_v2_t._fields_] == ["version", "total", "reserved", "free", "used"]


# -- opening and closing


@pytest.mark.parametrize(
    "error",
    [FakeNvml.NVML_ERROR_DRIVER_NOT_LOADED, FakeNvml.NVML_ERROR_LIBRARY_NOT_FOUND, FakeNvml.NVML_ERROR_NO_PERMISSION],
)
def test_open_is_none_when_nvml_init_fails(error):
    fake = FakeNvml(FakeDevice(), init_error=error)
    assert Nvml.open(module=fake) is None
    assert fake.calls["nvmlShutdown"] == 0


def test_open_is_none_and_shuts_down_when_the_device_count_fails():
    fake = FakeNvml(FakeDevice())
    fake.count_error = FakeNvml.NVML_ERROR_UNKNOWN
    assert Nvml.open(module=fake) is None
    assert (fake.calls["nvmlInit"], fake.calls["nvmlShutdown"]) == (1, 1)


def test_open_is_none_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes ``import pynvml`` raise ImportError
    assert Nvml.open() is None
    assert read_gpus_nvml() is None


def test_fifty_reads_initialise_once_and_keep_the_handles():
    fake = two_gpus()
    nvml = Nvml.open(module=fake)
    for _ in range(50):
        assert nvml.read() == [healthy(0, UUID0), healthy(1, UUID1, used=5 * GIB)]
        nvml.processes()
    nvml.close()
    assert fake.calls["nvmlInit"] == 1
    assert fake.calls["nvmlShutdown"] == 1
    assert fake.calls["nvmlDeviceGetHandleByIndex"] == 2
    assert fake.calls["nvmlDeviceGetUUID"] == 2
    assert fake.calls["nvmlDeviceGetMemoryInfo"] == 100


def test_close_shuts_down_once_and_later_reads_are_empty():
    fake = two_gpus()
    nvml = Nvml.open(module=fake)
    nvml.close()
    nvml.close()
    assert fake.calls["nvmlShutdown"] == 1
    assert nvml.read() == []
    assert nvml.processes() == []


def test_a_shutdown_error_is_swallowed():
    fake = two_gpus()
    nvml = Nvml.open(module=fake)
    fake.nvmlShutdown = lambda: (_ for _ in ()).throw(FakeNvmlError(FakeNvml.NVML_ERROR_UNINITIALIZED))
    nvml.close()


# -- per-device errors


@pytest.mark.parametrize(
    "query, error, problem",
    [
        ("memory", FakeNvml.NVML_ERROR_NOT_SUPPORTED, "memory info failed: NVML_ERROR_NOT_SUPPORTED"),
        ("memory", FakeNvml.NVML_ERROR_GPU_IS_LOST, "memory info failed: NVML_ERROR_GPU_IS_LOST"),
        ("handle", FakeNvml.NVML_ERROR_GPU_IS_LOST, "device handle failed: NVML_ERROR_GPU_IS_LOST"),
        ("name", FakeNvml.NVML_ERROR_UNKNOWN, "name failed: NVML_ERROR_UNKNOWN"),
        ("uuid", FakeNvml.NVML_ERROR_RESET_REQUIRED, "UUID failed: NVML_ERROR_RESET_REQUIRED"),
        ("memory", 77, "memory info failed: NVML error 77"),  # a code newer than the module knows
    ],
)
def test_a_failing_device_gets_a_problem_and_the_other_keeps_working(query, error, problem):
    nvml = Nvml.open(module=two_gpus(**{query: error}))
    first, second = nvml.read()
    assert first == healthy(0, UUID0)
    assert second.index == 1
    assert second.problem == problem
    assert (second.total_bytes, second.used_bytes, second.free_bytes, second.reserved_bytes) == (0, 0, 0, 0)


def test_a_device_lost_after_its_uuid_keeps_its_name_and_uuid():
    (reading,) = Nvml.open(module=FakeNvml(FakeDevice(uuid=UUID1, fail={"memory": 15}))).read()
    assert reading == GpuReading(
        0, "NVIDIA GeForce RTX 3090", 0, 0, 0, UUID1, problem="memory info failed: NVML_ERROR_GPU_IS_LOST"
    )


def test_a_device_that_fails_once_is_read_again_with_a_new_handle():
    fake = two_gpus(handle=FakeNvml.NVML_ERROR_GPU_IS_LOST)
    nvml = Nvml.open(module=fake)
    assert nvml.read()[1].problem == "device handle failed: NVML_ERROR_GPU_IS_LOST"
    fake.devices[1].fail = {"memory": FakeNvml.NVML_ERROR_GPU_IS_LOST}
    assert nvml.read()[1].problem == "memory info failed: NVML_ERROR_GPU_IS_LOST"
    fake.devices[1].fail = {}
    handles = fake.calls["nvmlDeviceGetHandleByIndex"]
    assert nvml.read()[1] == healthy(1, UUID1, used=5 * GIB)
    assert fake.calls["nvmlDeviceGetHandleByIndex"] == handles + 1  # the handle that failed was dropped
    nvml.read()
    assert fake.calls["nvmlDeviceGetHandleByIndex"] == handles + 1  # and the new one is kept


QUERIES = ["handle", "name", "uuid", "mig", "memory"]
ERRORS = [FakeNvml.NVML_ERROR_NOT_SUPPORTED, FakeNvml.NVML_ERROR_GPU_IS_LOST, FakeNvml.NVML_ERROR_UNKNOWN]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(QUERIES), st.sampled_from(ERRORS), max_size=3), min_size=1, max_size=4))
def test_read_never_raises_and_a_device_is_usable_exactly_when_its_queries_answer(failures):
    fake = FakeNvml(*[FakeDevice(uuid=f"GPU-{i}", fail=fail) for i, fail in enumerate(failures)])
    readings = Nvml.open(module=fake).read()
    assert [r.index for r in readings] == list(range(len(failures)))
    for reading, fail in zip(readings, failures, strict=True):
        # A MIG query that fails means "no MIG" (every consumer GPU says NOT_SUPPORTED): not a problem.
        assert (reading.problem is None) == (set(fail) <= {"mig"})
        if reading.problem is not None:
            assert reading.total_bytes == reading.used_bytes == reading.free_bytes == 0


# -- memory info versions


def test_v2_memory_info_gives_reserved_and_used_without_it():
    (reading,) = Nvml.open(module=FakeNvml(FakeDevice(total=80 * GIB, used=3 * GIB, reserved=GIB // 2))).read()
    assert (reading.total_bytes, reading.used_bytes, reading.reserved_bytes) == (80 * GIB, 3 * GIB, GIB // 2)
    assert reading.free_bytes == 80 * GIB - 3 * GIB - GIB // 2


def test_without_v2_memory_info_v1_is_used_with_reserved_zero_and_v2_is_not_asked_again():
    fake = FakeNvml(FakeDevice(total=24 * GIB, used=GIB, reserved=300 * MIB), FakeDevice(), has_v2=False)
    nvml = Nvml.open(module=fake)
    for _ in range(5):
        first, _second = nvml.read()
        assert first.problem is None
        assert (first.used_bytes, first.free_bytes, first.reserved_bytes) == (GIB + 300 * MIB, 23 * GIB - 300 * MIB, 0)
    assert fake.calls["nvmlDeviceGetMemoryInfo_v2"] == 1


def without(fake: FakeNvml, *names: str) -> SimpleNamespace:
    """A module like ``fake`` that lacks ``names`` (an older nvidia-ml-py), calls still counted by ``fake``."""
    return SimpleNamespace(
        **{name: getattr(fake, name) for name in dir(fake) if not name.startswith("_") and name not in names}
    )


def test_a_module_without_the_v2_struct_uses_v1():
    fake = FakeNvml(FakeDevice())
    (reading,) = Nvml.open(module=without(fake, "nvmlMemory_v2")).read()
    assert reading.reserved_bytes == 0 and reading.problem is None
    assert fake.calls["nvmlDeviceGetMemoryInfo_v2"] == 0


def test_a_device_that_refuses_v2_but_answers_v1_is_usable():
    fake = FakeNvml(FakeDevice())
    real = fake.nvmlDeviceGetMemoryInfo

    def v2_not_supported(handle, version=None):
        if version:
            raise FakeNvmlError(FakeNvml.NVML_ERROR_NOT_SUPPORTED)
        return real(handle)

    fake.nvmlDeviceGetMemoryInfo = v2_not_supported
    (reading,) = Nvml.open(module=fake).read()
    assert reading.problem is None and reading.reserved_bytes == 0 and reading.total_bytes == 24 * GIB


# -- MIG, names


def test_a_mig_enabled_gpu_is_marked_unsupported_and_the_other_is_not():
    fake = FakeNvml(FakeDevice(uuid=UUID0, mig=1), FakeDevice(uuid=UUID1, mig=0))
    mig, plain = Nvml.open(module=fake).read()
    assert mig == GpuReading(0, "NVIDIA GeForce RTX 3090", 0, 0, 0, UUID0, problem=MIG_PROBLEM)
    assert MIG_PROBLEM == "MIG mode is enabled; localllm does not support MIG yet"
    assert plain.problem is None and plain.uuid == UUID1


def test_names_and_uuids_given_as_bytes_are_decoded():
    (reading,) = Nvml.open(module=FakeNvml(FakeDevice(uuid=UUID0), as_bytes=True)).read()
    assert (reading.name, reading.uuid) == ("NVIDIA GeForce RTX 3090", UUID0)


# -- processes


def test_processes_of_every_device_with_a_process_on_two_gpus():
    fake = FakeNvml(
        FakeDevice(uuid=UUID0, processes=[(4242, 3 * GIB), (77, None)]), FakeDevice(uuid=UUID1, processes=[(4242, GIB)])
    )
    assert Nvml.open(module=fake).processes() == [
        GpuProcess(4242, 3 * GIB, 0, UUID0),
        GpuProcess(77, 0, 0, UUID0),  # NVML reports None where it cannot say (WDDM, some containers)
        GpuProcess(4242, GIB, 1, UUID1),
    ]


@pytest.mark.parametrize("query", ["handle", "uuid", "processes"])
def test_processes_skip_a_device_whose_query_fails(query):
    fake = FakeNvml(
        FakeDevice(uuid=UUID0, processes=[(1, 10)], fail={query: FakeNvml.NVML_ERROR_GPU_IS_LOST}),
        FakeDevice(uuid=UUID1, processes=[(2, 20)]),
    )
    assert Nvml.open(module=fake).processes() == [GpuProcess(2, 20, 1, UUID1)]


def test_processes_fall_back_to_the_v2_list_on_drivers_without_v3():
    fake = FakeNvml(
        FakeDevice(uuid=UUID0, processes=[(5, 50)]), FakeDevice(uuid=UUID1, processes=[(6, 60)]), has_v3_processes=False
    )
    nvml = Nvml.open(module=fake)
    for _ in range(3):
        assert nvml.processes() == [GpuProcess(5, 50, 0, UUID0), GpuProcess(6, 60, 1, UUID1)]
    assert fake.calls["nvmlDeviceGetComputeRunningProcesses"] == 1


def test_processes_without_either_list_skip_the_device():
    fake = FakeNvml(FakeDevice(processes=[(5, 50)]), has_v3_processes=False)
    assert Nvml.open(module=without(fake, "nvmlDeviceGetComputeRunningProcesses_v2")).processes() == []


# -- threads


def test_reads_from_several_threads_are_serialised():
    fake = two_gpus()
    nvml = Nvml.open(module=fake)
    results = []

    def reader():
        for _ in range(10):
            results.append(nvml.read())
            nvml.processes()

    threads = [threading.Thread(target=reader) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fake.most_inside == 1
    assert len(results) == 60 and all(r == results[0] for r in results)
    assert fake.calls["nvmlInit"] == 1


# -- the one-shot helper kept for callers that read once


def test_the_one_shot_helper_opens_and_closes_a_session(monkeypatch):
    fake = FakeNvml(FakeDevice(uuid=UUID0), FakeDevice(uuid=UUID1, fail={"memory": 3}))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    readings = read_gpus_nvml()
    assert [r.problem for r in readings] == [None, "memory info failed: NVML_ERROR_NOT_SUPPORTED"]
    assert (fake.calls["nvmlInit"], fake.calls["nvmlShutdown"]) == (1, 1)
