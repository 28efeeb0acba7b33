"""The scheduler driven synchronously: tables for the rules, hypothesis for the invariants."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.core.errors import (
    ModelGaveUp,
    ModelStartFailed,
    ModelTooLarge,
    QueueFull,
    QueueTimeout,
)
from supervisor.core.placement import Device
from supervisor.core.scheduler import Scheduler
from supervisor.core.slots import TRANSITIONS, Grant, Limits, ModelSlot, Note, Phase, Reject, Start, Stop

MIB = 1024**2


def scheduler(budgets=(100,), models=None, **limits) -> Scheduler:
    models = models or {"a": 40, "b": 40, "c": 40}
    devices = [Device(f"gpu{i}", b * MIB, index=i) for i, b in enumerate(budgets)]
    slots = [ModelSlot(name, need * MIB) for name, need in models.items()]
    return Scheduler(devices, slots, Limits(**{"min_residency": 0, **limits}))


def kinds(actions) -> list[str]:
    return [f"{type(a).__name__}:{getattr(a, 'model', '')}" for a in actions if not isinstance(a, Note)]


def decisions(actions) -> list:
    """The actions without the log notes."""
    return [a for a in actions if not isinstance(a, Note)]


def load(s: Scheduler, model: str, now: float) -> int:
    """Submit, start, report ready; returns the granted ticket."""
    ticket, actions = s.submit(model, now)
    assert kinds(actions) == [f"Start:{model}"]
    assert kinds(s.started(model, now)) == [f"Grant:{model}"]
    return ticket


def test_a_model_that_fits_is_started_then_granted():
    s = scheduler()
    ticket, actions = s.submit("a", 0)
    [start] = actions
    assert isinstance(start, Start) and start.device == "gpu0" and "fits on gpu0" in start.reason
    assert s.started("a", 1) == [Grant(ticket, "a")]
    assert s.slots["a"].phase is Phase.READY and s.slots["a"].in_flight == 1


def test_concurrent_requests_share_one_start():
    s = scheduler()
    actions = [a for _ in range(5) for a in s.submit("a", 0)[1]]
    assert kinds(actions) == ["Start:a"]
    assert kinds(s.started("a", 1)) == ["Grant:a"] * 5


def test_the_least_recently_used_idle_model_is_evicted_and_the_start_waits_for_its_stop():
    s = scheduler()
    load(s, "a", 0)
    s.finished("a", 1)
    load(s, "b", 2)
    s.finished("b", 3)
    _, actions = s.submit("c", 4)
    assert kinds(actions) == ["Stop:a"]  # a was used at 1, b at 3
    assert "evicted" in actions[0].reason and "a (40.0 MiB, idle 3s)" in actions[0].reason
    assert kinds(s.stopped("a", 5)) == ["Start:c"]


def test_ttl_expired_models_go_before_least_recently_used_ones():
    s = scheduler(models={"a": 40, "b": 40, "c": 40})
    s.slots["b"].ttl = 2.0
    load(s, "a", 0), s.finished("a", 1)
    load(s, "b", 2), s.finished("b", 3)
    _, actions = s.submit("c", 10)
    assert kinds(actions) == ["Stop:b"]


def test_a_busy_model_is_never_evicted_even_when_least_recently_used():
    s = scheduler()
    load(s, "a", 0)  # a stays in flight, and was used first
    load(s, "b", 1)
    s.finished("b", 2)
    _, actions = s.submit("c", 3)
    assert kinds(actions) == ["Stop:b"]


def test_grouping_serves_a_a_b_b():
    s = scheduler(budgets=(50,), models={"a": 40, "b": 40})
    t1, _ = s.submit("a", 0)
    t2, _ = s.submit("b", 0)
    t3, _ = s.submit("a", 0)
    t4, _ = s.submit("b", 0)
    assert kinds(s.started("a", 1)) == ["Grant:a", "Grant:a"]
    s.finished("a", 2)
    assert kinds(s.finished("a", 2)) == ["Stop:a"]
    assert kinds(s.stopped("a", 3)) == ["Start:b"]
    assert [a.ticket for a in s.started("b", 4)] == [t2, t4]
    assert t1 < t2 < t3 < t4


def test_requests_for_a_ready_model_wait_while_a_queued_model_needs_it_evicted():
    s = scheduler(budgets=(50,), models={"a": 40, "b": 40})
    load(s, "a", 0)
    s.submit("b", 1)  # waits: a is busy, and now draining
    assert s.slots["a"].draining
    _, actions = s.submit("a", 2)
    assert kinds(actions) == []  # queued behind b, not granted
    assert kinds(s.finished("a", 3)) == ["Stop:a"]
    assert kinds(s.stopped("a", 4)) == ["Start:b"]


def test_a_model_bigger_than_any_budget_is_refused_with_numbers():
    s = scheduler(budgets=(100, 60), models={"huge": 150})
    [reject] = decisions(s.submit("huge", 0)[1])
    assert isinstance(reject, Reject) and isinstance(reject.error, ModelTooLarge)
    assert "needs 150.0 MiB but the largest device budget is 100.0 MiB (gpu0)" in reject.error.message


def test_pinned_models_are_never_evicted_and_can_make_a_model_unplaceable():
    s = scheduler(models={"p": 70, "x": 40})
    s.slots["p"].pinned = True
    load(s, "p", 0), s.finished("p", 1)
    [reject] = decisions(s.submit("x", 5)[1])
    assert isinstance(reject.error, ModelTooLarge) and "pinned models leave at most 30.0 MiB" in reject.error.message


def test_multi_gpu_places_on_the_best_single_device():
    s = scheduler(budgets=(100, 50), models={"a": 45, "b": 45})
    _, [start_a] = s.submit("a", 0)
    assert start_a.device == "gpu1"  # best fit: the smallest device it fits on
    s.started("a", 0)
    _, [start_b] = s.submit("b", 1)
    assert start_b.device == "gpu0"


def test_min_residency_makes_a_swap_wait():
    s = scheduler(budgets=(50,), models={"a": 40, "b": 40}, min_residency=30)
    load(s, "a", 0), s.finished("a", 1)
    _, actions = s.submit("b", 5)
    assert kinds(actions) == [] and "min_residency 30s" in actions[0].message
    assert kinds(s.tick(31)) == ["Stop:a"]


def test_queue_bound_and_wait_bound_reject_with_retry_after():
    s = scheduler(budgets=(50,), models={"a": 40, "b": 40}, max_queue=2, queue_timeout=60)
    load(s, "a", 0)
    s.submit("b", 1)
    s.submit("b", 2)
    _, [full] = s.submit("b", 3)
    assert isinstance(full.error, QueueFull) and full.error.retry_after > 0
    timed_out = s.tick(61.5)
    assert [type(a.error) for a in timed_out if isinstance(a, Reject)] == [QueueTimeout]
    assert s.waiting() == 1


def test_idle_unload_after_ttl_never_for_pinned():
    s = scheduler(models={"a": 10, "p": 10})
    s.slots["a"].ttl = s.slots["p"].ttl = 5.0
    s.slots["p"].pinned = True
    load(s, "a", 0), s.finished("a", 0)
    load(s, "p", 0), s.finished("p", 0)
    assert kinds(s.tick(4)) == []
    assert kinds(s.tick(5)) == ["Stop:a"]


def test_a_failed_start_rejects_its_waiters_and_frees_the_device():
    s = scheduler()
    t1, _ = s.submit("a", 0)
    error = ModelStartFailed("a", "server exited during startup", 1, "boom")
    assert decisions(s.started("a", 1, error)) == [Reject(t1, "a", error)]
    assert s.slots["a"].phase is Phase.FAILED and s.residents() == []


# -- properties ------------------------------------------------------------------


@dataclass
class World:
    """A fake effects layer: remembers what the scheduler asked for, checks the invariants."""

    s: Scheduler
    now: float = 0.0
    granted: list[str] = field(default_factory=list)  # models of requests in flight
    pending_starts: set[str] = field(default_factory=set)
    pending_stops: set[str] = field(default_factory=set)
    outcome: dict[int, str] = field(default_factory=dict)
    crashed: set[str] = field(default_factory=set)  # crashed, container removal under way
    phases: dict[str, Phase] = field(default_factory=dict)  # each model's phase, as the published moves say

    def check_moves(self) -> None:
        """Every phase change came out of ``moves``, each one in the transition table, in an unbroken chain."""
        for move in self.s.moves():
            assert move.after in TRANSITIONS[move.before], move
            assert self.phases.get(move.model, Phase.STOPPED) is move.before, (move, self.phases.get(move.model))
            self.phases[move.model] = move.after
        for name, slot in self.s.slots.items():
            assert self.phases.get(name, Phase.STOPPED) is slot.phase, f"{name} changed phase without a move"

    def apply(self, actions) -> None:
        for a in actions:
            if isinstance(a, Start):
                assert a.model not in self.pending_starts, f"second start of {a.model} while one is under way"
                slot = self.s.slots[a.model]
                assert not slot.held, f"{a.model} started while a config change holds it"
                assert not slot.gave_up and slot.retry_at <= self.now, f"{a.model} started while backing off"
                self.pending_starts.add(a.model)
            elif isinstance(a, Stop):
                slot = self.s.slots[a.model]
                assert not slot.pinned or "idle" not in a.reason, "pinned model unloaded"
                assert a.model not in self.granted, f"evicted {a.model} with requests in flight"
                assert a.model not in self.pending_starts, f"evicted {a.model} while loading"
                self.pending_stops.add(a.model)
            elif isinstance(a, Grant):
                assert self.s.slots[a.model].phase is Phase.READY and not self.s.slots[a.model].held
                assert a.ticket not in self.outcome
                self.outcome[a.ticket] = "granted"
                self.granted.append(a.model)
            elif isinstance(a, Reject):
                assert a.ticket not in self.outcome
                self.outcome[a.ticket] = type(a.error).__name__
        self.check_memory()
        self.check_moves()

    def check_memory(self) -> None:
        for device in self.s.devices:
            occupying = [
                slot
                for slot in self.s.slots.values()
                if slot.device == device.id
                and (slot.phase in (Phase.READY, Phase.STOPPING) or slot.name in self.pending_starts)
            ]
            launching = sum(r.bytes for r in self.s.residents() if r.name.endswith("#new") and r.device == device.id)
            assert sum(slot.need for slot in occupying) + launching <= device.budget, (
                f"{device.id} overfilled: {occupying} and {launching} bytes held for launches"
            )

    def room_on(self, device: str) -> int:
        """What a config change checks before it reserves room for a launch (Fleet.room_on)."""
        budget = next(d.budget for d in self.s.devices if d.id == device)
        return (
            budget
            - sum(r.bytes for r in self.s.residents() if r.device == device)
            - sum(self.s.slots[m].need for m in self.pending_starts if self.s.slots[m].device == device)
        )


catalogs = st.dictionaries(st.sampled_from("abcdef"), st.integers(5, 120), min_size=1, max_size=6)
events = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "submit",
                "finish",
                "start_ok",
                "start_fail",
                "stop",
                "tick",
                "crash",
                "hold",
                "release",
                "reserve",
                "unreserve",
                "need",
                "unload",
                "adopt",
                "handover",
            ]
        ),
        st.integers(0, 100),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    catalog=catalogs,
    budgets=st.lists(st.integers(40, 200), min_size=1, max_size=3),
    pinned=st.sets(st.sampled_from("abcdef"), max_size=2),
    sequence=events,
    min_residency=st.sampled_from([0.0, 5.0]),
)
def test_invariants_hold_for_any_event_sequence(catalog, budgets, pinned, sequence, min_residency):
    s = scheduler(budgets=tuple(budgets), models=catalog, min_residency=min_residency, max_queue=20, queue_timeout=50)
    for name in pinned & set(catalog):
        s.slots[name].pinned = True
    world = World(s)
    names = sorted(catalog)
    submitted = []
    for kind, pick in sequence:
        world.now += 1
        if kind == "submit":
            ticket, actions = s.submit(names[pick % len(names)], world.now)
            submitted.append(ticket)
            world.apply(actions)
        elif kind == "finish" and world.granted:
            world.apply(s.finished(world.granted.pop(pick % len(world.granted)), world.now))
        elif kind in ("start_ok", "start_fail") and world.pending_starts:
            model = sorted(world.pending_starts)[pick % len(world.pending_starts)]
            world.pending_starts.discard(model)
            error = None if kind == "start_ok" else ModelStartFailed(model, "exited")
            world.apply(s.started(model, world.now, error))
        elif kind == "stop" and (world.pending_stops or world.crashed):
            stopping = sorted(world.pending_stops | world.crashed)
            model = stopping[pick % len(stopping)]
            error = ModelStartFailed(model, "died") if model in world.crashed else None
            world.pending_stops.discard(model)
            world.crashed.discard(model)
            world.apply(s.stopped(model, world.now, error))
        elif kind == "tick":
            world.now += pick
            world.apply(s.tick(world.now))
        elif kind == "crash":
            ready = sorted(n for n, slot in s.slots.items() if slot.phase is Phase.READY)
            if ready:
                model = ready[pick % len(ready)]
                assert s.crashed(model, world.now, "died") == [Stop(model, "died", "crash")]
                world.crashed.add(model)
        # What a config change does to the scheduler, through its own methods (rollout.py and the fleet):
        elif kind == "hold":
            s.hold(names[pick % len(names)])
        elif kind == "release":
            s.release(names[pick % len(names)])
            world.apply(s.tick(world.now))
        elif kind == "reserve":
            model, device = names[pick % len(names)], s.devices[pick % len(s.devices)].id
            need = s.slots[model].need
            if world.room_on(device) >= need:  # the fleet reserves only room that is there
                s.reserve_launch(model, device, need)
                world.apply([])
        elif kind == "unreserve":
            s.release_launch(names[pick % len(names)])
            world.apply(s.tick(world.now))
        elif kind == "need":
            stopped = sorted(n for n, slot in s.slots.items() if slot.phase is Phase.STOPPED)
            if stopped:  # learned or measured: the fleet sets a need while the model holds no memory
                s.set_need(stopped[pick % len(stopped)], 5 + pick)
        elif kind == "unload":  # an operator's unload, a config change taking a model offline, Ollama evicting
            world.apply(s.unload(names[pick % len(names)], world.now, "unloaded"))
        elif kind == "handover":  # a config change takes a ready model offline for its next version
            ready = sorted(n for n, slot in s.slots.items() if slot.phase is Phase.READY)
            if ready:
                model = ready[pick % len(ready)]
                s.hold(model)
                s.hand_over(model, s.slots[model].need)
        elif kind == "adopt":  # a running server found, or a config change attaching its new one
            model, device = names[pick % len(names)], s.devices[pick % len(s.devices)].id
            if s.adopt(model, device, world.now):
                world.apply(s.tick(world.now))
        world.check_moves()

    # Drain: finish everything; every request ends granted or rejected, none is forgotten.
    for name in names:  # the config change ends: its holds and launches go
        s.release(name)
        s.release_launch(name)
    for _ in range(200):
        if world.granted:
            world.apply(s.finished(world.granted.pop(), world.now))
        elif world.pending_starts:
            world.apply(s.started(world.pending_starts.pop(), world.now))
        elif world.pending_stops:
            world.apply(s.stopped(world.pending_stops.pop(), world.now))
        elif world.crashed:
            world.apply(s.stopped(world.crashed.pop(), world.now, ModelStartFailed("x", "died")))
        elif s.waiting():
            world.now += 10
            world.apply(s.tick(world.now))
        else:
            break
    assert set(world.outcome) == set(submitted)


def test_unload_stops_only_a_ready_idle_model():
    s = scheduler()
    load(s, "a", 0)
    assert s.unload("a", 1, "operator") == []  # in flight
    s.finished("a", 2)
    assert s.unload("a", 3, "operator") == [Stop("a", "operator")]
    assert s.unload("b", 3, "operator") == []  # not loaded


def test_a_crash_frees_the_device_once_stopped_and_the_next_request_starts_it_again():
    s = scheduler()
    load(s, "a", 0)
    s.finished("a", 1)
    assert s.crashed("a", 2, "server exited") == [Stop("a", "server exited", "crash")]
    assert s.slots["a"].phase is Phase.STOPPING and len(s.residents()) == 1
    error = ModelStartFailed("a", "server exited while serving", 137)
    s.stopped("a", 3, error)
    assert s.slots["a"].phase is Phase.FAILED and s.residents() == []
    _, actions = s.submit("a", 4)
    assert kinds(actions) == ["Start:a"]


def test_a_crashed_model_restarts_on_the_backoff_schedule_without_any_request():
    s = scheduler(restart_delay=1.0, restart_max_delay=4.0)
    load(s, "a", 0)
    s.finished("a", 1)
    s.crashed("a", 2, "died")
    notes = [a.message for a in s.stopped("a", 2, ModelStartFailed("a", "died", 137)) if isinstance(a, Note)]
    assert notes == ["failure 1 of 5: restarting in 1s"]
    assert kinds(s.tick(2.9)) == []
    assert kinds(s.tick(3.0)) == ["Start:a"]


def test_a_crash_loop_backs_off_exponentially_then_gives_up():
    s = scheduler(restart_delay=1.0, restart_max_delay=4.0, max_failures=4)
    load(s, "a", 0)
    s.finished("a", 0)
    s.crashed("a", 1, "died")
    s.stopped("a", 1, ModelStartFailed("a", "died"))
    now, delays = 1.0, []
    for _ in range(3):
        due = s.slots["a"].retry_at
        delays.append(due - now)
        assert kinds(s.tick(due - 0.01)) == []
        assert kinds(s.tick(due)) == ["Start:a"]
        now = due
        s.started("a", now, ModelStartFailed("a", "exited at once", 1))
    assert delays == [1.0, 2.0, 4.0]
    assert s.slots["a"].gave_up and s.slots["a"].phase is Phase.FAILED
    assert kinds(s.tick(now + 1000)) == []
    [reject] = decisions(s.submit("a", now + 1000)[1])
    assert isinstance(reject.error, ModelGaveUp) and "failed 4 times in a row" in reject.error.message
    s.reset("a")
    assert kinds(s.submit("a", now + 1001)[1]) == ["Start:a"]


def test_a_model_that_ran_long_enough_starts_its_failure_count_afresh():
    s = scheduler(stable_after=60.0)
    s.slots["a"].failures = 3
    load(s, "a", 0)
    s.finished("a", 100)
    s.crashed("a", 100, "died")
    s.stopped("a", 100, ModelStartFailed("a", "died"))
    assert s.slots["a"].failures == 1


@pytest.mark.parametrize("stopped_cleanly", [True, False])
def test_a_model_stopped_on_purpose_after_it_was_ready_starts_its_failure_count_afresh(stopped_cleanly):
    s = scheduler(stable_after=60.0, max_failures=5)
    s.slots["a"].failures = 4  # four failures, then a start that worked
    load(s, "a", 0)
    s.finished("a", 1)
    if stopped_cleanly:  # unloaded (as when evicted or idle): the run it had was not part of a crash loop
        s.unload("a", 2, "operator")
        s.stopped("a", 2)
        load(s, "a", 3)
        s.finished("a", 4)
    s.crashed("a", 5, "killed")
    s.stopped("a", 5, ModelStartFailed("a", "killed", 137))
    assert (s.slots["a"].failures, s.slots["a"].gave_up) == ((1, False) if stopped_cleanly else (5, True))


def test_requests_during_backoff_wait_for_the_retry_and_get_its_outcome():
    s = scheduler(restart_delay=2.0)
    t1, _ = s.submit("a", 0)
    assert decisions(s.started("a", 0, ModelStartFailed("a", "exited", 1))) == [Reject(t1, "a", s.slots["a"].error)]
    t2, actions = s.submit("a", 1)
    assert kinds(actions) == []  # waits: the next start is due at 2
    assert kinds(s.tick(2)) == ["Start:a"]
    assert s.started("a", 2.5) == [Grant(t2, "a")]


def test_an_evicted_or_idle_unloaded_model_is_not_restarted():
    s = scheduler(budgets=(50,), models={"a": 40, "b": 40})
    load(s, "a", 0)
    s.finished("a", 1)
    s.submit("b", 2)
    s.stopped("a", 3)
    assert not s.slots["a"].wanted
    assert kinds(s.tick(100)) == []


def test_on_two_gpus_a_busy_model_is_drained_only_where_evicting_it_could_help():
    s = scheduler(budgets=(20, 8), models={"w": 18, "x": 7, "y": 15})
    load(s, "x", 0)  # goes to gpu1 (best fit), stays busy
    load(s, "y", 0)  # gpu0, stays busy
    assert s.slots["x"].device == "gpu1" and s.slots["y"].device == "gpu0"
    s.submit("w", 1)  # only gpu0 can ever hold w
    assert s.slots["y"].draining and not s.slots["x"].draining
    _, actions = s.submit("x", 2)
    assert kinds(actions) == ["Grant:x"]


def test_adoption_counts_only_what_is_accounted_not_what_was_measured():
    devices = [Device("gpu0", 23 * MIB, measured_free=9 * MIB, index=0)]  # measured: the container itself uses 14
    s = Scheduler(devices, [ModelSlot("a", 14 * MIB), ModelSlot("b", 14 * MIB)], Limits(min_residency=0))
    assert s.adopt("a", "gpu0", 0) and s.slots["a"].phase is Phase.READY and s.slots["a"].wanted
    assert not s.adopt("b", "gpu0", 0)  # a second one would not fit the budget


def test_next_wakeup_is_the_earliest_backoff_of_a_wanted_or_requested_model():
    s = scheduler(restart_delay=3.0)
    assert s.next_wakeup(0) is None
    s.submit("a", 0)
    s.started("a", 1, ModelStartFailed("a", "exited"))
    assert s.next_wakeup(1) is None  # nobody waits and nothing wants it
    s.submit("a", 2)
    assert s.next_wakeup(2) == 4.0
    assert s.next_wakeup(4.5) is None  # already over: no busy wake-ups
    s.slots["a"].held = True
    assert s.next_wakeup(2) is None


def test_a_new_catalog_clears_failures_and_rejects_requests_for_models_that_went():
    s = scheduler(budgets=(50,), max_failures=1)
    s.submit("a", 0)
    s.started("a", 0, ModelStartFailed("a", "exited"))
    assert s.slots["a"].gave_up
    s.submit("b", 1)  # starts
    t3, _ = s.submit("c", 1)  # waits: b is starting and there is room for one
    actions = s.replace_slots([ModelSlot("a", 40 * MIB), ModelSlot("b", 40 * MIB)], 2)
    [reject] = [a for a in actions if isinstance(a, Reject)]
    assert reject.ticket == t3 and reject.error.code == "model_not_found"
    assert set(s.slots) == {"a", "b"}
    assert not s.slots["a"].gave_up and s.slots["a"].failures == 0
    s.started("b", 3)
    s.finished("b", 4)
    assert kinds(s.submit("a", 5)[1]) == ["Stop:b"]  # a may start again: b makes room


def test_a_held_model_is_not_granted_new_requests_so_it_can_drain():
    s = scheduler()
    load(s, "a", 0)
    s.slots["a"].held = True
    ticket, actions = s.submit("a", 1)
    assert kinds(actions) == []
    s.slots["a"].held = False
    assert s.tick(2) == [Grant(ticket, "a")]


def test_events_for_a_model_that_left_the_catalog_are_harmless():
    s = scheduler(budgets=(50,), models={"a": 40, "b": 40})
    load(s, "a", 0)  # a request stays in flight
    s.replace_slots([ModelSlot("b", 40 * MIB)], 1)
    assert s.finished("a", 2) == [] and s.stopped("a", 3) == [] and s.started("a", 4) == []


# -- GPU admission (issue 11): what can never fit is refused at once, with the numbers ---------------


def measured_scheduler(
    free_mib: dict[str, int | None],
    budgets: dict[str, int],
    models: dict[str, int],
    problems: dict[str, str] | None = None,
) -> Scheduler:
    devices = [
        Device(d, b * MIB, None if free_mib[d] is None else free_mib[d] * MIB, index=i, problem=(problems or {}).get(d))
        for i, (d, b) in enumerate(budgets.items())
    ]
    return Scheduler(devices, [ModelSlot(n, need * MIB) for n, need in models.items()], Limits(min_residency=0))


def test_a_need_above_what_an_empty_device_measures_free_is_refused_at_once_with_the_numbers():
    # NVML memory info v1 counts driver-reserved memory as used: the budget (total - reserve) exceeds
    # what can ever be free. A need in between used to wait for the queue timeout, then get a 503.
    s = measured_scheduler({"gpu0": 70}, {"gpu0": 100}, {"big": 80})
    [reject] = decisions(s.submit("big", 0)[1])
    assert isinstance(reject, Reject) and isinstance(reject.error, ModelTooLarge)
    assert reject.error.http_status == 503
    assert reject.error.message == (
        "'big' needs 80.0 MiB, more than any device can give: gpu0 has 70.0 MiB free of its 100.0 MiB budget "
        "with none of our models on it (the driver or other processes use the rest)"
    )
    assert s.slots["big"].phase is Phase.STOPPED and not s.queue


def test_a_preloaded_model_that_can_never_fit_is_refused_and_says_why():
    s = measured_scheduler({"gpu0": 70}, {"gpu0": 100}, {"big": 80})
    s.slots["big"].wanted = True
    notes = [a for a in s.tick(0) if isinstance(a, Note)]
    assert [n.model for n in notes] == ["big"] and "more than any device can give" in notes[0].message
    assert not s.slots["big"].wanted  # not tried again at every tick


def test_a_preloaded_model_that_must_wait_says_why():
    s = measured_scheduler({"gpu0": 100}, {"gpu0": 100}, {"a": 60, "b": 60})
    load(s, "a", 0)  # serving one request: cannot be evicted
    s.slots["b"].wanted = True
    notes = [a for a in s.tick(1) if isinstance(a, Note)]
    assert [(n.model, "waits for room" in n.message) for n in notes] == [("b", True)]


def test_where_our_own_model_holds_the_memory_the_need_waits_for_its_eviction_instead():
    s = measured_scheduler({"gpu0": 100}, {"gpu0": 100}, {"a": 60, "b": 60})
    load(s, "a", 0)
    s.devices = [Device("gpu0", 100 * MIB, 30 * MIB, index=0)]  # the next reading sees a's memory in use
    ticket, actions = s.submit("b", 1)
    assert kinds(actions) == []  # a is busy: b waits rather than being refused
    assert kinds(s.finished("a", 2)) == ["Stop:a"]


def test_the_device_with_room_is_used_when_another_can_never_fit():
    s = measured_scheduler({"gpu0": 10, "gpu1": 90}, {"gpu0": 100, "gpu1": 100}, {"m": 80})
    [start] = decisions(s.submit("m", 0)[1])
    assert isinstance(start, Start) and start.device == "gpu1"


def test_an_unusable_device_is_never_chosen_and_a_host_with_none_left_refuses_naming_it():
    s = measured_scheduler(
        {"gpu0": 0, "gpu1": 90},
        {"gpu0": 0, "gpu1": 100},
        {"m": 50},
        problems={"gpu0": "memory info failed: NVML_ERROR_GPU_IS_LOST"},
    )
    [start] = decisions(s.submit("m", 0)[1])
    assert start.device == "gpu1"
    s = measured_scheduler(
        {"gpu0": 0}, {"gpu0": 0}, {"m": 50}, problems={"gpu0": "MIG mode is enabled; localllm does not support MIG yet"}
    )
    [reject] = decisions(s.submit("m", 0)[1])
    assert reject.error.message == (
        "no usable device to place 'm' on (gpu0: MIG mode is enabled; localllm does not support MIG yet)"
    )


def test_a_model_limited_to_one_device_is_placed_only_there():
    s = measured_scheduler({"gpu0": 100, "gpu1": 100}, {"gpu0": 100, "gpu1": 100}, {"o": 50, "x": 50})
    s.slots["o"].devices = ("gpu0",)
    s.slots["x"].devices = ("gpu7",)
    [start] = decisions(s.submit("o", 0)[1])
    assert start.device == "gpu0"
    [reject] = decisions(s.submit("x", 0)[1])
    assert "the devices it may use are not on this host" in reject.error.message


def test_a_model_taken_offline_for_its_next_version_keeps_its_room_from_the_queue():
    """The soak's finding (seed 7707): a waiting model took the room the old version freed, and the new version
    then started over the budget. Handed over, the room is the next version's the moment the old one is gone."""
    s = scheduler(budgets=(100,), models={"a": 60, "b": 60})
    load(s, "a", 0)
    s.finished("a", 0)  # a is ready and idle
    s.hold("a")
    s.hand_over("a", 60 * MIB)
    ticket, actions = s.submit("b", 1)
    assert kinds(actions) == []  # b waits: a's room is promised, so a is not evicted for it
    assert kinds(s.unload("a", 2, "replaced by a new config")) == ["Stop:a"]
    assert kinds(s.stopped("a", 3)) == []  # and b still waits: the room went to a's next version
    assert ("a#new", "gpu0", 60 * MIB) in [(r.name, r.device, r.bytes) for r in s.residents()]
    s.release("a")
    s.release_launch("a")  # the next version attached: its room is the model's again
    assert s.adopt("a", "gpu0", 4)
    assert s.slots["a"].handover == 0 and all(not r.name.endswith("#new") for r in s.residents())


def test_a_model_offline_for_a_change_takes_back_the_room_held_for_it_even_while_an_eviction_hands_room_over():
    """The CI soak's finding (seed 681193311): the revert's relaunch passed its gate, but the budget counted an
    evicted model and the one taking its room both, and the relaunched model could not be attached."""
    s = scheduler(budgets=(25,), models={"a": 10, "b": 10, "c": 10})
    for name in ("a", "b"):
        load(s, name, 0)
        s.finished(name, 0)
    s.hold("a")
    s.hand_over("a", 10 * MIB)
    s.unload("a", 1, "replaced by a new config")
    s.stopped("a", 1)  # offline: its 10 are held for its launch (the revert's relaunch of the last-good version)
    _, actions = s.submit("c", 2)
    assert kinds(actions) == ["Stop:b"]  # 5 free: b is evicted for c, and c waits for b's stop
    assert sum(r.bytes for r in s.residents()) > 25 * MIB  # b, c and a's launch, counted together for a moment
    s.release("a")
    assert s.adopt("a", "gpu0", 3) and s.slots["a"].phase is Phase.READY
    assert all(not r.name.endswith("#new") for r in s.residents())  # the held room is a's own now


def test_without_a_hand_over_a_waiting_model_takes_the_room_a_held_model_frees():
    s = scheduler(budgets=(100,), models={"a": 60, "b": 60})
    load(s, "a", 0)
    s.finished("a", 0)
    s.hold("a")
    ticket, actions = s.submit("b", 1)
    assert kinds(actions) == ["Stop:a"]  # evicted for b: nothing was promised
    assert kinds(s.stopped("a", 2)) == ["Start:b"]
