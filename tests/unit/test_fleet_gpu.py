"""The fleet's GPU paths, driven in-process: a recording fake runtime and a fake NVML session (no GPU here).

Each test is one scenario run with ``asyncio.run``; the fakes are in ``fleet_harness``.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from supervisor.config.profiles import load_profiles
from supervisor.core.errors import ModelStartFailed, ModelTooLarge
from supervisor.core.slots import Phase
from supervisor.fleet import gpu_meter
from supervisor.runtime.nvml import Nvml
from supervisor.state.learned import LearnedSizes

from .fake_nvml import FakeDevice, FakeNvml
from .fleet_harness import GIB, FakeGpuSession, gpu_fleet, gpu_reading, kinds, scenario

PROFILES = load_profiles()
ONE_GPU, TWO_GPUS = PROFILES["gpu-1x24g"], PROFILES["gpu-2x24g"]


def events_of(bus, kind: str) -> list:
    return [e for e in bus.recent() if e.kind == kind]


async def load_on_gpu(fleet, runtime, gpus, name: str, used: int, gpu_index: int = 0) -> str:
    """Load ``name``; its container's process shows ``used`` bytes on the GPU as soon as it runs."""

    async def show_up():
        while not fleet.instances[name].container_id:
            await asyncio.sleep(0.01)
        gpus.put(runtime.containers[fleet.instances[name].container_id].pids[0], used, gpu_index)

    helper = asyncio.ensure_future(show_up())
    await fleet.load(name)
    await helper
    return fleet.instances[name].container_id


def test_a_gpu_model_whose_process_never_shows_up_in_nvml_fails_as_running_on_the_cpu(tmp_path, monkeypatch):
    # llama-server that cannot initialise CUDA serves from the CPU with /health 200 and -ngl ignored.
    monkeypatch.setattr(gpu_meter, "GPU_CHECK_WAIT", 0.3)
    gpus = FakeGpuSession([gpu_reading(0)])

    async def body(session):
        fleet, runtime, bus = gpu_fleet(tmp_path, ONE_GPU, session, gpus, {"m": 4 * GIB})
        with pytest.raises(ModelStartFailed) as failed:
            await fleet.load("m")
        assert "it is running on the CPU" in failed.value.message
        assert "no process of its container uses gpu0 (GPU-0) in NVML" in failed.value.message
        assert "NVIDIA Container Toolkit" in failed.value.message
        assert runtime.containers == {} and len(runtime.removed()) == 1  # the container went
        assert fleet.phase(fleet.instances["m"]) is Phase.FAILED
        assert "load_failed" in kinds(bus)
        await fleet.shutdown()

    scenario(body, tmp_path)


def test_a_ready_model_is_measured_every_tick_and_its_peak_is_learned_at_once(tmp_path):
    gpus = FakeGpuSession([gpu_reading(0)])
    learned = LearnedSizes(tmp_path / "learned.json")

    async def body(session):
        fleet, runtime, bus = gpu_fleet(tmp_path, ONE_GPU, session, gpus, {"m": 4 * GIB}, learned)
        container = await load_on_gpu(fleet, runtime, gpus, "m", 3 * GIB)
        instance = fleet.instances["m"]
        assert (instance.measured, instance.peak, learned.get("key-m")) == (3 * GIB, 3 * GIB, 3 * GIB)
        gpus.put(runtime.containers[container].pids[0], 5 * GIB)  # the first long prompt grows the pools
        await fleet.tick()
        assert (instance.measured, instance.peak, learned.get("key-m")) == (5 * GIB, 5 * GIB, 5 * GIB)
        assert fleet.scheduler.slots["m"].need == 5 * GIB  # the next admission charges the peak
        gpus.put(runtime.containers[container].pids[0], 4 * GIB)  # pools do not shrink, but if they did:
        await fleet.tick()
        assert (instance.measured, instance.peak, learned.get("key-m")) == (4 * GIB, 5 * GIB, 5 * GIB)
        assert fleet.describe(instance)["memory"]["peak"] == 5 * GIB
        await fleet.shutdown()

    scenario(body, tmp_path)


def test_a_learned_size_comes_down_after_three_runs_that_served_and_peaked_lower(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_meter, "MEMORY_WAIT", 0.5)
    gpus = FakeGpuSession([gpu_reading(0)])
    learned = LearnedSizes(tmp_path / "learned.json")
    learned.record("key-m", 8 * GIB, "m")  # measured once during an unusual load

    async def body(session):
        fleet, runtime, _ = gpu_fleet(tmp_path, ONE_GPU, session, gpus, {"m": 4 * GIB}, learned)
        fleet.instances["m"].sizing = replace(fleet.instances["m"].sizing, learned=8 * GIB)
        for run, peak in enumerate((5 * GIB, 6 * GIB, 5 * GIB, 5 * GIB)):
            container = await load_on_gpu(fleet, runtime, gpus, "m", peak)
            if run > 0:  # the first run serves nothing: it must not count
                async with fleet.use("m"):
                    pass
            gpus.drop(runtime.containers[container].pids[0])
            await fleet.unload("m")
            expected = 8 * GIB if run < 3 else 6 * GIB  # down to the highest of the three lower peaks
            assert learned.get("key-m") == expected, run
        assert fleet.scheduler.slots["m"].need == 6 * GIB
        await fleet.shutdown()

    scenario(body, tmp_path)


def test_a_stop_waits_until_the_containers_own_processes_have_left_the_gpu(tmp_path):
    gpus = FakeGpuSession([gpu_reading(0)])

    async def body(session):
        fleet, runtime, bus = gpu_fleet(tmp_path, ONE_GPU, session, gpus, {"m": 4 * GIB})
        container = await load_on_gpu(fleet, runtime, gpus, "m", 3 * GIB)
        pid = runtime.containers[container].pids[0]
        loop = asyncio.get_running_loop()
        began = loop.time()
        loop.call_later(0.6, gpus.drop, pid)  # the driver frees the pages a little after the container went
        await fleet.unload("m")
        assert loop.time() - began >= 0.6
        assert fleet.phase(fleet.instances["m"]) is Phase.STOPPED
        assert "memory_wait" not in kinds(bus)
        await fleet.shutdown()

    scenario(body, tmp_path)


def test_a_wait_that_times_out_is_a_warning_event_with_the_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_meter, "MEMORY_WAIT", 0.4)
    gpus = FakeGpuSession([gpu_reading(0)])

    async def body(session):
        fleet, runtime, bus = gpu_fleet(tmp_path, ONE_GPU, session, gpus, {"m": 4 * GIB})
        await load_on_gpu(fleet, runtime, gpus, "m", 3 * GIB)
        await fleet.unload("m")  # the process never leaves (GH200: pages not released at exit)
        [warning] = events_of(bus, "memory_wait")
        assert warning.message == (
            "memory on gpu0 did not come back within 0.4s: 1 process(es) still hold "
            "3072.0 MiB of the 3072.0 MiB they held (expected to free 3072.0 MiB)"
        )
        assert warning.data["still_held"] == 3 * GIB and warning.model == "m"
        assert fleet.phase(fleet.instances["m"]) is Phase.STOPPED
        await fleet.shutdown()

    scenario(body, tmp_path)


def test_a_crashed_container_whose_processes_are_gone_is_not_waited_for(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_meter, "MEMORY_WAIT", 5.0)
    gpus = FakeGpuSession([gpu_reading(0)])

    async def body(session):
        fleet, runtime, bus = gpu_fleet(tmp_path, ONE_GPU, session, gpus, {"m": 4 * GIB})
        container = await load_on_gpu(fleet, runtime, gpus, "m", 3 * GIB)
        gpus.drop(runtime.containers[container].pids[0])  # it died: the driver freed its memory
        loop = asyncio.get_running_loop()
        began = loop.time()
        fleet.crashed(fleet.instances["m"], "server exited")
        while fleet.phase(fleet.instances["m"]) is Phase.STOPPING:
            await asyncio.sleep(0.01)
        assert loop.time() - began < 2.0 and "memory_wait" not in kinds(bus)
        await fleet.shutdown()

    scenario(body, tmp_path)


def test_a_need_no_empty_device_can_give_is_refused_at_once_with_the_numbers(tmp_path):
    # 24 GiB card, 1 GiB profile reserve, but only 5 GiB measured free: the driver or another process holds the rest.
    gpus = FakeGpuSession([gpu_reading(0, free=5 * GIB)])

    async def body(session):
        fleet, runtime, _ = gpu_fleet(tmp_path, ONE_GPU, session, gpus, {"big": 10 * GIB})
        with pytest.raises(ModelTooLarge) as refused:
            await asyncio.wait_for(fleet.load("big"), 2)  # not the 10-minute queue timeout
        assert refused.value.http_status == 503 and refused.value.code == "model_too_large"
        assert refused.value.message == (
            "'big' needs 10240.0 MiB, more than any device can give: gpu0 has 4096.0 MiB free of its 23552.0 MiB "
            "budget with none of our models on it (the driver or other processes use the rest)"
        )
        assert runtime.calls == []
        await fleet.shutdown()

    scenario(body, tmp_path)


def test_a_lost_gpu_is_marked_with_an_event_and_models_go_to_the_other(tmp_path):
    gpus = FakeGpuSession([gpu_reading(0), gpu_reading(1)])

    async def body(session):
        fleet, runtime, bus = gpu_fleet(tmp_path, TWO_GPUS, session, gpus, {"m": 4 * GIB})
        gpus.readings = [gpu_reading(0, problem="memory info failed: NVML_ERROR_GPU_IS_LOST"), gpu_reading(1)]
        await fleet.tick()
        await fleet.tick()  # published once, not at every tick
        [event] = events_of(bus, "device")
        assert event.message == "gpu0 is unusable: memory info failed: NVML_ERROR_GPU_IS_LOST"
        assert fleet.devices()[0] == {
            "id": "gpu0",
            "uuid": "GPU-0",
            "budget": 0,
            "measured_free": 0,
            "problem": "memory info failed: NVML_ERROR_GPU_IS_LOST",
        }
        await load_on_gpu(fleet, runtime, gpus, "m", GIB, gpu_index=1)
        assert fleet.scheduler.slots["m"].device == "gpu1"
        assert fleet.instances["m"].spec.gpu_device_ids == ("GPU-1",)  # addressed by UUID
        gpus.readings = [gpu_reading(0), gpu_reading(1)]
        await fleet.tick()
        assert events_of(bus, "device")[-1].message == "gpu0 is usable again"
        await fleet.shutdown()

    scenario(body, tmp_path)


@pytest.mark.parametrize(
    "error", [FakeNvml.NVML_ERROR_NOT_SUPPORTED, FakeNvml.NVML_ERROR_GPU_IS_LOST], ids=["not-supported", "gpu-is-lost"]
)
def test_one_gpu_failing_its_nvml_queries_is_marked_and_the_other_serves(tmp_path, error):
    # The real NVML session over a fake pynvml: the first GPU answers memory info with an error.
    fake = FakeNvml(FakeDevice(uuid="GPU-a", fail={"memory": error}), FakeDevice(uuid="GPU-b"))
    nvml = Nvml.open(module=fake)

    async def body(session):
        fleet, runtime, bus = gpu_fleet(tmp_path, TWO_GPUS, session, nvml, {"m": 4 * GIB})
        name = {FakeNvml.NVML_ERROR_NOT_SUPPORTED: "NOT_SUPPORTED", FakeNvml.NVML_ERROR_GPU_IS_LOST: "GPU_IS_LOST"}
        problem = f"memory info failed: NVML_ERROR_{name[error]}"
        assert fleet.devices()[0]["problem"] == problem and fleet.devices()[1]["problem"] is None
        loading = asyncio.ensure_future(fleet.load("m"))
        while not fleet.instances["m"].container_id:
            await asyncio.sleep(0.01)
        fake.devices[1].processes = [(runtime.containers[fleet.instances["m"].container_id].pids[0], 2 * GIB)]
        await loading
        await fleet.tick()
        assert fleet.scheduler.slots["m"].device == "gpu1" and fleet.instances["m"].peak == 2 * GIB
        assert fake.calls["nvmlInit"] == 1  # one session, however often it is read
        await fleet.shutdown()

    scenario(body, tmp_path)
    nvml.close()
