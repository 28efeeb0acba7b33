"""The owner of live state, driven in-process with the recording fake runtime: no Docker, in seconds.

Each "container" is a small server on its socket (tests/unit/fleet_harness.py); the fake records
what the fleet asked of the engine, and can make a server exit or fail to start.
"""

from __future__ import annotations

import asyncio

import pytest

from supervisor.core.containers import LABEL_MODEL
from supervisor.core.errors import ModelStartFailed
from supervisor.core.slots import Phase
from supervisor.runtime.container_runtime import ContainerInfo

from .fleet_harness import RecordingFakeRuntime, cpu_fleet, kinds, scenario, until

MIB = 2**20
FAST_RESTARTS = {"restart": {"delay": 0.05, "max_delay": 0.1, "max_failures": 2, "stable_after": 0}}


def test_a_load_starts_one_container_and_an_unload_removes_it(tmp_path):
    async def body(session):
        fleet, runtime, bus = cpu_fleet(tmp_path, session, {"a": 10 * MIB})
        instance = await fleet.load("a")
        assert fleet.phase(instance) is Phase.READY and instance.container_id in runtime.containers
        assert runtime.started() == [instance.spec.name] and instance.spec.network == "none"
        await fleet.unload("a")
        assert fleet.phase(instance) is Phase.STOPPED and runtime.containers == {}
        assert [k for k in kinds(bus) if k != "state"] == ["load", "unload"]
        await fleet.shutdown()

    scenario(body, tmp_path)


def test_a_crash_is_restarted_after_its_backoff(tmp_path):
    async def body(session):
        fleet, runtime, bus = cpu_fleet(
            tmp_path, session, {"a": 10 * MIB}, models={"a": {"preload": True}}, **FAST_RESTARTS
        )
        await fleet.start_models(["a"])
        first = fleet.instances["a"].container_id
        await runtime.exit(first)
        await fleet.watch.probe_liveness()  # the socket is gone and the container exited: a crash at once
        await until(
            lambda: (
                fleet.phase(fleet.instances["a"]) is Phase.READY
                and fleet.instances["a"].container_id not in (None, first)
            ),
            what="the restart",
        )
        assert len(runtime.started()) == 2 and first in runtime.removed()
        assert "crash" in kinds(bus) and "restart" in kinds(bus)
        await fleet.shutdown()

    scenario(body, tmp_path)


def test_a_model_that_keeps_failing_is_given_up_after_max_failures(tmp_path):
    async def body(session):
        runtime = RecordingFakeRuntime(failing={"a"})
        fleet, runtime, bus = cpu_fleet(
            tmp_path, session, {"a": 10 * MIB}, runtime, models={"a": {"preload": True}}, **FAST_RESTARTS
        )
        await fleet.start_models(["a"])
        await until(lambda: fleet.describe(fleet.instances["a"])["gave_up"], what="giving up")
        assert len(runtime.started()) == 2 and runtime.containers == {}  # each failed container removed
        assert fleet.phase(fleet.instances["a"]) is Phase.FAILED
        assert "exit code 1" in fleet.instances["a"].error and "boom" in fleet.instances["a"].error
        await fleet.shutdown()

    scenario(body, tmp_path)


@pytest.mark.parametrize("gave_up", [False, True])
def test_an_operators_load_of_a_failed_model_starts_it_now_with_a_fresh_count(tmp_path, gave_up):
    async def body(session):
        runtime = RecordingFakeRuntime(failing={"a"})
        restart = {"delay": 0.05 if gave_up else 600, "max_delay": 600, "max_failures": 2, "stable_after": 600}
        fleet, runtime, bus = cpu_fleet(
            tmp_path, session, {"a": MIB}, runtime, models={"a": {"preload": True}}, restart=restart
        )
        await fleet.start_models(["a"])  # fails: then waits out its 600 s backoff, or gives up after a retry
        await until(lambda: fleet.describe(fleet.instances["a"])["gave_up"] is gave_up, what="the failure")
        runtime.failing.clear()  # the operator fixed what failed
        await asyncio.wait_for(fleet.load("a"), 5)  # now, not after the backoff
        view = fleet.describe(fleet.instances["a"])
        assert (fleet.phase(fleet.instances["a"]), view["failures"], view["gave_up"]) == (Phase.READY, 0, False)
        await fleet.shutdown()

    scenario(body, tmp_path)


def test_a_container_whose_removal_failed_is_swept_at_the_next_tick_even_while_another_model_starts(tmp_path):
    async def body(session):
        fleet, runtime, bus = cpu_fleet(tmp_path, session, {"a": MIB, "b": MIB})
        await fleet.load("a")
        leftover = fleet.instances["a"].container_id
        runtime.unremovable.add(leftover)  # the engine goes away while "a" is unloaded
        await fleet.unload("a")
        assert leftover in runtime.containers and fleet.phase(fleet.instances["a"]) is not Phase.READY
        runtime.unremovable.clear()  # the engine is back
        runtime.start_delay = 0.5  # "b" is being created while the tick runs: listed, owned by no model yet
        loading = asyncio.create_task(fleet.load("b"))
        await until(lambda: any(c.info.status == "created" for c in runtime.containers.values()), what="creating")
        await fleet.tick()
        assert leftover not in runtime.containers and fleet.instances["a"].container_id is None
        await loading
        assert fleet.phase(fleet.instances["b"]) is Phase.READY and runtime.removed().count(leftover) == 4
        await fleet.shutdown()

    scenario(body, tmp_path)


def test_a_model_that_does_not_fit_beside_another_evicts_it(tmp_path):
    async def body(session):
        fleet, runtime, bus = cpu_fleet(tmp_path, session, {"a": MIB, "b": MIB})
        budget = fleet.scheduler.devices[0].budget
        for name in ("a", "b"):
            fleet.scheduler.set_need(name, budget * 6 // 10)  # one at a time
        await fleet.load("a")
        await fleet.load("b")
        assert (fleet.phase(fleet.instances["a"]), fleet.phase(fleet.instances["b"])) == (Phase.STOPPED, Phase.READY)
        assert runtime.running("a") == [] and len(runtime.running("b")) == 1
        assert "evict" in kinds(bus)
        await fleet.shutdown()

    scenario(body, tmp_path)


def test_after_its_own_crash_the_fleet_adopts_matching_recreates_drifted_and_removes_foreign(tmp_path):
    async def body(session):
        runtime = RecordingFakeRuntime()
        before, _, _ = cpu_fleet(tmp_path, session, {"a": MIB, "b": MIB}, runtime)
        await before.load("a")
        await before.load("b")
        kept = before.instances["a"].container_id
        foreign = ContainerInfo(
            "f" * 64,
            "localllm-unit-gone",
            "running",
            None,
            False,
            {**runtime.containers[kept].info.labels, LABEL_MODEL: "gone"},
        )
        runtime.containers[foreign.id] = type(runtime.containers[kept])(foreign, [], runtime.containers[kept].runner)
        # The daemon dies (nothing is stopped) and comes back with b's context changed.
        after, _, bus = cpu_fleet(
            tmp_path, session, {"a": MIB, "b": MIB}, runtime, models={"b": {"context_size": 1024}}
        )
        recreate = await after.adopter.adopt_existing()
        assert recreate == ["b"]
        assert after.instances["a"].container_id == kept and after.phase(after.instances["a"]) is Phase.READY
        assert set(runtime.containers) == {kept}  # b's drifted container and the foreign one went
        assert len(runtime.started()) == 2  # nothing was started again here: the caller starts b
        assert kinds(bus).count("adopt") == 1
        await after.shutdown()

    scenario(body, tmp_path)


def test_a_client_that_leaves_while_queued_gives_up_its_place(tmp_path):
    async def body(session):
        runtime = RecordingFakeRuntime(start_delay=0.3)
        fleet, runtime, _ = cpu_fleet(tmp_path, session, {"a": MIB}, runtime)

        async def request():
            async with fleet.use("a"):
                await asyncio.sleep(10)

        waiting = asyncio.create_task(request())
        await until(lambda: fleet.scheduler.view("a").waiting == 1, what="the request to queue")
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert fleet.scheduler.view("a").waiting == 0
        await until(lambda: fleet.phase(fleet.instances["a"]) is Phase.READY, what="the start to finish")
        assert fleet.scheduler.view("a").in_flight == 0  # nobody holds it: the leaver was never granted
        await fleet.shutdown()
        assert runtime.containers == {}

    scenario(body, tmp_path)


def test_a_failed_start_is_reported_with_the_servers_last_words(tmp_path):
    async def body(session):
        fleet, runtime, _ = cpu_fleet(tmp_path, session, {"a": MIB}, RecordingFakeRuntime(failing={"a"}))
        try:
            await fleet.load("a")
        except ModelStartFailed as failed:
            assert failed.reason == "server exited during startup" and failed.log_tail == "boom"
        else:
            raise AssertionError("the start should have failed")
        assert runtime.containers == {} and fleet.phase(fleet.instances["a"]) is Phase.FAILED
        await fleet.shutdown()

    scenario(body, tmp_path)
