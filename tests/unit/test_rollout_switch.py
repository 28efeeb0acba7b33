"""Rollout's switch, driven by a SwitchRequest against a recording stand-in for the fleet's rollout primitives:
beside or offline, committed, or reverted on a failed gate. No Docker; the generation store is real."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from supervisor.core.errors import ApplyFailed, ModelStartFailed
from supervisor.core.slots import Phase
from supervisor.fleet.events import EventBus, EventKind
from supervisor.fleet.rollout import DRAIN_PATIENCE, ApplyStep, Rollout, SwitchRequest
from supervisor.state.generations import ChangePlan, GenerationStatus, GenerationStore


@dataclass
class FakeScheduler:
    """The scheduler's views Rollout reads (``view``), over slots the test sets."""

    slots: dict = field(default_factory=dict)

    def view(self, name: str) -> SimpleNamespace:
        return self.slots[name]


@dataclass
class RecordingFleet:
    """The primitives Rollout uses, recording each call; ``room`` is what ``room_on`` says of every device."""

    room: int
    fail_launch: set[str] = field(default_factory=set)
    calls: list[tuple] = field(default_factory=list)
    events: EventBus = field(default_factory=EventBus)
    degraded: str | None = None
    instances: dict = field(default_factory=dict)
    scheduler: FakeScheduler = field(default_factory=FakeScheduler)

    @property
    def switching(self) -> RecordingFleet:
        return self  # the real fleet's switching unit: the same primitives, recorded here

    def room_on(self, device: str) -> int:
        return self.room

    async def launch(self, entry, device, need, config=None):
        self.calls.append(("launch", entry.name, device, need, config))
        if entry.name in self.fail_launch:
            raise ModelStartFailed(entry.name, "not ready within 5s")
        return SimpleNamespace(device=device), f"new-{entry.name}"

    async def take_offline(self, name: str, patience: float, next_need: int = 0) -> None:
        self.calls.append(("take_offline", name, patience))
        self.scheduler.slots[name].phase = Phase.STOPPED

    def commit(self, config, sizings, switched):
        self.calls.append(("commit", config, dict(switched)))
        return [(name, f"old-{name}", self.instances[name].entry) for name in switched]

    def attach(self, name, spec, container_id) -> bool:
        self.calls.append(("attach", name, container_id))
        return True

    def retire(self, name, container_id, patience, entry) -> None:
        self.calls.append(("retire", name, container_id, patience))

    async def abandon(self, name, spec, container_id) -> None:
        self.calls.append(("abandon", name, container_id))

    def release_hold(self, name: str) -> None:
        self.calls.append(("release_hold", name))


def setup(tmp_path, room: int, fail_launch=()):
    fleet = RecordingFleet(room, set(fail_launch))
    for name in ("a", "b"):
        fleet.instances[name] = SimpleNamespace(entry=SimpleNamespace(name=name))
        fleet.scheduler.slots[name] = SimpleNamespace(phase=Phase.READY, need=10)
    store = GenerationStore(tmp_path / "generations")
    number = store.record("models: []\n", "test", {}).number
    config = object()
    request = SwitchRequest(
        number=number,
        config=config,
        sizings={"a": SimpleNamespace(need=10), "b": SimpleNamespace(need=10)},
        plan=ChangePlan(keep=("b",), replace=("a",), remove=(), add=(), update=()),
        running={"a": SimpleNamespace(device="gpu0"), "b": SimpleNamespace(device="gpu0")},
        entries={name: fleet.instances[name].entry for name in ("a", "b")},
        reloading=(),
        report={"generation": number},
    )
    return Rollout(fleet, store), fleet, store, request, config


def apply_statuses(fleet: RecordingFleet) -> list[str]:
    return [e.data["status"] for e in fleet.events.recent() if e.kind == EventKind.APPLY]


def test_with_room_the_new_version_starts_beside_the_old_and_the_old_retires(tmp_path):
    rollout, fleet, store, request, config = setup(tmp_path, room=100)
    offline: list[str] = []
    report = asyncio.run(rollout._switch(request, offline))
    assert report == {"generation": request.number, "status": "good"}
    assert offline == [] and store.get(request.number).status is GenerationStatus.GOOD
    assert [c[0] for c in fleet.calls] == ["launch", "commit", "retire"]
    assert fleet.calls[0] == ("launch", "a", "gpu0", 10, config)
    assert fleet.calls[2] == ("retire", "a", "old-a", DRAIN_PATIENCE)
    assert apply_statuses(fleet) == [ApplyStep.LAUNCHING, ApplyStep.HEALTHY, GenerationStatus.GOOD]


def test_without_room_the_old_version_stops_first_and_the_new_one_is_attached(tmp_path):
    rollout, fleet, store, request, config = setup(tmp_path, room=5)
    offline: list[str] = []
    asyncio.run(rollout._switch(request, offline))
    assert offline == ["a"]
    assert [c[0] for c in fleet.calls] == ["take_offline", "launch", "commit", "attach"]
    assert fleet.calls[2] == ("commit", config, {})  # an offline model is attached, not switched
    assert apply_statuses(fleet) == ["stopping_old", "launching", "healthy", "good"]


def test_a_failed_gate_reverts_records_the_failure_and_answers_with_the_report(tmp_path):
    rollout, fleet, store, request, _ = setup(tmp_path, room=100, fail_launch={"a"})
    with pytest.raises(ApplyFailed) as failed:
        asyncio.run(rollout._switch(request, []))
    assert failed.value.report["status"] == "failed" and failed.value.report["degraded"] is None
    assert "not ready within 5s" in failed.value.report["reason"]
    assert store.get(request.number).status is GenerationStatus.FAILED
    assert [c[0] for c in fleet.calls] == ["launch"]  # nothing started, nothing to abandon or bring back
    assert apply_statuses(fleet) == ["launching", "failed"]


def test_a_failed_gate_after_stopping_the_old_brings_it_back(tmp_path):
    rollout, fleet, store, request, _ = setup(tmp_path, room=5, fail_launch={"a"})
    attempts = []
    launch = fleet.launch

    async def launch_once_failing(entry, device, need, config=None):
        attempts.append(config)
        if len(attempts) == 1:
            return await launch(entry, device, need, config)
        return SimpleNamespace(device=device), "last-good-a"  # the revert's relaunch with the old spec

    fleet.launch = launch_once_failing
    with pytest.raises(ApplyFailed):
        asyncio.run(rollout._switch(request, []))
    assert attempts[1] is None  # the live config: the last-good spec
    assert ("attach", "a", "last-good-a") in fleet.calls and fleet.degraded is None
