"""The scheduler: a pure state machine that decides what loads, what is evicted and who waits.

Events come in as method calls (a request arrives or ends, a start or stop
finished, the clock ticked); each returns the actions the fleet must carry
out. It does no I/O, reads no clock and never logs, so tests drive it
synchronously and hypothesis can throw random event sequences at it.

Rules:
- A request for a ready model is granted at once, unless that model is
  draining (a waiting request needs it evicted); then it queues behind.
- Waiting requests are grouped by model in order of first arrival, so
  A B A B is served A A B B. Groups are served strictly in order: a group
  that must wait blocks the ones behind it, so nothing starves.
- A model starts only once every eviction made for it has finished
  (the fleet reports ``stopped`` only when the memory is actually free).
- Requests for one model share one start (single flight).
"""

from __future__ import annotations

from collections import OrderedDict

from supervisor.core.errors import (
    DockerUnavailable,
    LocalllmError,
    ModelGaveUp,
    ModelTooLarge,
    QueueFull,
    QueueTimeout,
    UnknownModel,
)
from supervisor.core.placement import Admit, Device, Refuse, Resident, plan_admission
from supervisor.core.slots import (
    TRANSITIONS,
    Action,
    Grant,
    IllegalTransition,
    Limits,
    ModelSlot,
    Moved,
    Note,
    Phase,
    Reject,
    SlotView,
    Start,
    Stop,
    Ticket,
)
from supervisor.core.stop_cause import StopCause

RETRY_AFTER = 5  # seconds a refused client is told to wait before trying again


class Scheduler:
    def __init__(self, devices: list[Device], slots: list[ModelSlot], limits: Limits = Limits()):
        self.devices = devices
        self.slots = {slot.name: slot for slot in slots}
        self.limits = limits
        self.queue: OrderedDict[str, list[Ticket]] = OrderedDict()
        # model -> (device, bytes): the room held for the new container a config change starts beside the old
        self._launches: dict[str, tuple[str, int]] = {}
        self._next_ticket = 0
        self._moved: list[Moved] = []
        self._last_note: dict[str, str] = {}

    # -- events ----------------------------------------------------------------

    def submit(self, model: str, now: float) -> tuple[int, list[Action]]:
        """A request for ``model`` arrives; returns its ticket and what to do."""
        self._next_ticket += 1
        ticket = Ticket(self._next_ticket, model, now)
        slot = self.slots[model]
        if slot.phase is Phase.READY and not slot.draining and not slot.held and model not in self.queue:
            return ticket.id, [self._grant(ticket, now)]
        if slot.gave_up and slot.error is not None:
            return ticket.id, [Reject(ticket.id, model, slot.error)]
        if self.waiting() >= self.limits.max_queue:
            return ticket.id, [
                Reject(
                    ticket.id,
                    model,
                    QueueFull(
                        f"{self.waiting()} requests are already waiting (max_queue {self.limits.max_queue})",
                        retry_after=RETRY_AFTER,
                    ),
                )
            ]
        self.queue.setdefault(model, []).append(ticket)
        return ticket.id, self._pump(now)

    def finished(self, model: str, now: float) -> list[Action]:
        """A granted request ended (its model may have left the catalog meanwhile)."""
        slot = self.slots.get(model)
        if slot is None:
            return self._pump(now)
        slot.in_flight -= 1
        slot.last_used = now
        return self._pump(now)

    def started(self, model: str, now: float, error: LocalllmError | None = None) -> list[Action]:
        """The fleet finished starting ``model``: ready, or failed with ``error`` (its container is gone)."""
        slot = self.slots.get(model)
        if slot is None:
            return self._pump(now)
        slot.start_sent = False
        if slot.phase is not Phase.STARTING:
            return self._pump(now)  # a start of a slot that changed since (left the catalog and came back)
        if error is None:
            self._move(slot, Phase.READY)
            slot.loaded_at, slot.last_used, slot.error = now, now, None
            slot.wanted = True
            return self._pump(now)
        return self._fail(slot, error, now) + self._pump(now)

    def stopped(self, model: str, now: float, error: LocalllmError | None = None) -> list[Action]:
        """``model``'s container is gone and its memory free; ``error`` if it died rather than was stopped."""
        actions: list[Action] = []
        for other in self.slots.values():
            if model in other.awaiting:
                other.awaiting.discard(model)
                actions += self._send_start_if_clear(other)
        slot = self.slots.get(model)
        if slot is None or slot.phase is not Phase.STOPPING:
            return actions + self._pump(now)  # a stop of a slot that changed since
        if slot.handover and slot.device is not None:  # the room goes to its next version, not to the queue
            self._launches[model] = (slot.device, slot.handover)
            slot.handover = 0
        slot.device, slot.draining = None, False
        if error is not None and slot.wanted:  # it died rather than was stopped: a crash
            if now - slot.loaded_at >= self.limits.stable_after:
                slot.failures = 0  # it had been running fine: a fresh count
            actions += self._fail(slot, error, now)
        elif error is not None:
            self._move(slot, Phase.FAILED)
            slot.error = error
        else:  # stopped on purpose after it was ready (idle, evicted, unloaded): its run broke any crash loop
            self._move(slot, Phase.STOPPED)
            slot.failures = 0
        return actions + self._pump(now)

    def adopt(self, model: str, device: str, now: float) -> bool:
        """A running container found at start-up, or launched by a config change: take it as ready if it fits its
        device's budget, or if it runs in the room held for it by ``reserve_launch`` (which then becomes its own:
        a model that takes over another's room, as in an eviction, may still count both for a moment)."""
        slot = self.slots[model]
        target = next((d for d in self.devices if d.id == device), None)
        if slot.phase is not Phase.STOPPED or target is None:
            return False
        launch = self._launches.get(model)
        if launch is not None and launch[0] == device and launch[1] >= slot.need:
            del self._launches[model]  # the room held for the container it launched is now its own
        else:
            # Budget accounting only: a measured reading already counts this very container as used.
            accounted = target.budget - sum(r.bytes for r in self.residents() if r.device == device)
            if accounted < slot.need:
                return False
        self._move(slot, Phase.READY)
        slot.device, slot.loaded_at, slot.last_used, slot.wanted = device, now, now, True
        return True

    def set_devices(self, devices: list[Device]) -> None:
        """The devices as read now (budgets, problems, free memory); the next admission uses them."""
        self.devices = devices

    def reserve_launch(self, model: str, device: str, need: int) -> None:
        """Hold ``need`` bytes on ``device`` for a container a config change starts beside ``model``'s old one."""
        self._launches[model] = (device, need)

    def release_launch(self, model: str) -> None:
        """The new container was taken (attach or commit) or abandoned: its room is no longer held apart."""
        self._launches.pop(model, None)
        if model in self.slots:
            self.slots[model].handover = 0

    def hand_over(self, model: str, need: int) -> None:
        """A config change takes ``model`` offline to start its next version (``need`` bytes) in its place: when
        its server is gone, that room is held for the launch at once, before any waiting model can take it."""
        self.slots[model].handover = need

    def hold(self, model: str) -> None:
        """No start of ``model`` until ``release``: a config change is replacing it."""
        self.slots[model].held = True

    def release(self, model: str) -> None:
        if model in self.slots:  # the config change is over for it: nothing is kept for a next version either
            self.slots[model].held = False
            self.slots[model].handover = 0

    def set_need(self, model: str, need: int) -> None:
        """What ``model`` needs, as measured or learned since its slot was made; the next admission uses it."""
        slot = self.slots.get(model)
        if slot is not None:
            slot.need = need

    def reset(self, model: str) -> None:
        """An operator (or a new config) clears the failure count of ``model``."""
        slot = self.slots[model]
        slot.failures, slot.gave_up, slot.retry_at = 0, False, 0.0

    def withdraw(self, ticket: int, now: float) -> list[Action]:
        """A waiting request went away (its client disconnected) before it was granted."""
        for model, tickets in list(self.queue.items()):
            remaining = [t for t in tickets if t.id != ticket]
            if len(remaining) != len(tickets):
                if remaining:
                    self.queue[model] = remaining
                else:
                    del self.queue[model]
                return self._pump(now)
        return []

    def crashed(self, model: str, now: float, reason: str) -> list[Action]:
        """A ready model's server died or hung; the fleet removes it, then reports ``stopped`` with the error."""
        slot = self.slots[model]
        if slot.phase is not Phase.READY:
            return []
        self._move(slot, Phase.STOPPING)
        return [Stop(model, reason, StopCause.CRASH)]

    def next_wakeup(self, now: float) -> float | None:
        """When the earliest future backoff ends for a model someone waits for or wants running; None if none.

        A backoff already over needs no wake-up: the start was tried, or waits for room (the tick retries).
        """
        due = [
            s.retry_at
            for s in self.slots.values()
            if s.phase is Phase.FAILED
            and not s.gave_up
            and not s.held
            and s.retry_at > now
            and (s.wanted or s.name in self.queue)
        ]
        return min(due) if due else None

    def unload(self, model: str, now: float, reason: str, cause: StopCause = StopCause.UNLOAD) -> list[Action]:
        """Stop ``model`` if it is ready and idle (idle unload by an operator, or a config change taking it offline).

        A failed model is cleared instead: stopped, not wanted, its failures forgotten.
        """
        slot = self.slots[model]
        if slot.phase is Phase.FAILED and not slot.held:
            self._move(slot, Phase.STOPPED)
            slot.wanted, slot.error = False, None
            self.reset(model)
            return self._pump(now)
        if slot.phase is Phase.READY and slot.in_flight == 0:
            self._move(slot, Phase.STOPPING)
            slot.wanted = False
            return [Stop(model, reason, cause)]
        return []

    def tick(self, now: float) -> list[Action]:
        """Time passed: expire waits past the bound, unload idle models past their TTL."""
        actions: list[Action] = []
        for model, tickets in list(self.queue.items()):
            keep = [t for t in tickets if now - t.since < self.limits.queue_timeout]
            for t in tickets:
                if t not in keep:
                    actions.append(
                        Reject(
                            t.id,
                            model,
                            QueueTimeout(
                                f"waited {now - t.since:.0f}s for '{model}' "
                                f"(queue_timeout {self.limits.queue_timeout:g}s)",
                                retry_after=RETRY_AFTER,
                            ),
                        )
                    )
            if keep:
                self.queue[model] = keep
            else:
                del self.queue[model]
        for slot in self.slots.values():
            if (
                slot.phase is Phase.READY
                and slot.in_flight == 0
                and not slot.pinned
                and slot.ttl
                and now - slot.last_used >= slot.ttl
            ):
                self._move(slot, Phase.STOPPING)
                slot.wanted = False
                idle = f"idle for {now - slot.last_used:.0f}s (ttl {slot.ttl:g}s)"
                actions.append(Stop(slot.name, idle, StopCause.IDLE))
        return actions + self._pump(now)

    # -- views -----------------------------------------------------------------

    def view(self, model: str) -> SlotView:
        slot = self.slots[model]
        return SlotView(
            slot.phase,
            slot.device,
            slot.need,
            slot.in_flight,
            len(self.queue.get(model, ())),
            slot.held,
            slot.error,
            slot.ttl,
            slot.failures,
            slot.gave_up,
        )

    def views(self) -> dict[str, SlotView]:
        """Every model's view, in catalog order."""
        return {name: self.view(name) for name in self.slots}

    def devices_for(self, slot: ModelSlot) -> list[Device]:
        """The devices ``slot`` may be placed on (an Ollama model: the one its server sees)."""
        return [d for d in self.devices if not slot.devices or d.id in slot.devices]

    def waiting(self) -> int:
        return sum(len(tickets) for tickets in self.queue.values())

    def residents(self) -> list[Resident]:
        held = [
            Resident(f"{name}#new", device, need, busy_changing=True) for name, (device, need) in self._launches.items()
        ]
        return held + [
            Resident(
                s.name,
                s.device or "",
                s.need,
                s.in_flight,
                s.pinned,
                busy_changing=s.phase is not Phase.READY or s.handover > 0,  # not evicted: its room is promised
                last_used=s.last_used,
                loaded_at=s.loaded_at,
                ttl=s.ttl,
            )
            for s in self.slots.values()
            if s.holds_memory
        ]

    def replace_slots(self, slots: list[ModelSlot], now: float) -> list[Action]:
        """A new catalog: keep the live state of models that stay, reject requests for models that went."""
        actions: list[Action] = []
        for name in set(self.slots) - {s.name for s in slots}:
            actions += [
                Reject(t.id, name, UnknownModel(name, [s.name for s in slots])) for t in self.queue.pop(name, [])
            ]
        kept = {s.name for s in slots}
        for slot in self.slots.values():
            slot.awaiting &= kept  # a dropped model's stop is no longer awaited
        for slot in slots:
            old = self.slots.get(slot.name)
            if old is not None:
                old.need, old.pinned, old.ttl, old.devices = slot.need, slot.pinned, slot.ttl, slot.devices
                old.wanted = old.wanted or slot.wanted
                old.failures, old.gave_up, old.retry_at = 0, False, 0.0  # a config change is a fresh start
        self.slots = {s.name: self.slots.get(s.name, s) for s in slots}
        for slot in self.slots.values():
            actions += self._send_start_if_clear(slot)
        return actions + self._pump(now)

    # -- decisions ---------------------------------------------------------------

    def _pump(self, now: float) -> list[Action]:
        """Walk the waiting groups in order: grant the ready, place the rest until one must wait."""
        actions: list[Action] = []
        for slot in self.slots.values():
            slot.draining = False
        blocked = False
        restarts = [s.name for s in self.slots.values() if s.wanted and s.name not in self.queue]
        for model in list(self.queue) + restarts:
            slot = self.slots[model]
            if slot.phase is Phase.READY:
                if not slot.draining and not slot.held and model in self.queue:
                    actions += [self._grant(t, now) for t in self.queue.pop(model)]
                continue
            if (
                blocked
                or slot.phase not in (Phase.STOPPED, Phase.FAILED)
                or slot.gave_up
                or slot.held
                or slot.retry_at > now
            ):
                continue  # behind a waiting group, busy starting or stopping, given up, or backing off
            decision = plan_admission(
                model, slot.need, self.devices_for(slot), self.residents(), now, self.limits.min_residency
            )
            if isinstance(decision, Refuse):
                error = ModelTooLarge(decision.reason)
                slot.wanted = False
                actions += [Reject(t.id, model, error) for t in self.queue.pop(model, [])]
                actions += self._note(model, decision.reason)
            elif isinstance(decision, Admit):
                actions += self._admit(slot, decision)
            elif model in self.queue:
                for name in decision.blockers:  # new requests for these queue up behind this group
                    self.slots[name].draining = True
                actions += self._note(model, decision.reason)
                blocked = True  # strict order: no later group may take the room this one waits for
            else:  # a preloaded or restarting model with no request yet: it waits too, and says why
                actions += self._note(model, decision.reason)
        return actions

    def _move(self, slot: ModelSlot, to: Phase) -> None:
        """The one place a phase changes: checked against ``TRANSITIONS`` and kept for ``moves``."""
        if to not in TRANSITIONS[slot.phase]:
            raise IllegalTransition(f"'{slot.name}': {slot.phase} -> {to} is not a change the scheduler makes")
        self._moved.append(Moved(slot.name, slot.phase, to))
        slot.phase = to

    def moves(self) -> list[Moved]:
        """The phase changes since the last call, in order (the fleet publishes each as a ``state`` event)."""
        moved, self._moved = self._moved, []
        return moved

    def _fail(self, slot: ModelSlot, error: LocalllmError, now: float) -> list[Action]:
        """A start failed or a running model died: back off, or give up after max_failures.

        An unreachable engine is not the model's fault: it backs off but does not count.
        """
        if not isinstance(error, DockerUnavailable) or slot.failures == 0:
            slot.failures += 1
        self._move(slot, Phase.FAILED)
        slot.device, slot.error = None, error
        if slot.failures >= self.limits.max_failures:
            slot.gave_up = True
            slot.error = ModelGaveUp(
                f"'{slot.name}' failed {slot.failures} times in a row and will not be restarted until an "
                f"operator acts or the config changes; last error: {error.message}"
            )
            rejected: list[Action] = [Reject(t.id, slot.name, slot.error) for t in self.queue.pop(slot.name, [])]
            return rejected + [Note(slot.name, slot.error.message)]
        delay = self.limits.restart_delay_after(slot.failures)
        slot.retry_at = now + delay
        rejected = [Reject(t.id, slot.name, error) for t in self.queue.pop(slot.name, [])]
        what = "restarting" if slot.wanted else "next start possible"
        return rejected + [
            Note(slot.name, f"failure {slot.failures} of {self.limits.max_failures}: {what} in {delay:g}s")
        ]

    def _admit(self, slot: ModelSlot, decision: Admit) -> list[Action]:
        actions: list[Action] = []
        for name in decision.evict:
            victim = self.slots[name]
            self._move(victim, Phase.STOPPING)
            victim.wanted = False
            actions.append(Stop(name, f"evicted: {decision.reason}", StopCause.EVICT))
        self._move(slot, Phase.STARTING)
        slot.device, slot.error = decision.device, None
        slot.awaiting = set(decision.evict)
        self._last_note.pop(slot.name, None)
        return actions + self._send_start_if_clear(slot, decision.reason)

    def _send_start_if_clear(self, slot: ModelSlot, reason: str = "") -> list[Action]:
        if slot.phase is not Phase.STARTING or slot.awaiting or slot.start_sent:
            return []
        slot.start_sent = True
        return [Start(slot.name, slot.device or "", reason or f"'{slot.name}' starts on {slot.device}: room was freed")]

    def _grant(self, ticket: Ticket, now: float) -> Grant:
        slot = self.slots[ticket.model]
        slot.in_flight += 1
        slot.last_used = now
        return Grant(ticket.id, ticket.model)

    def _note(self, model: str, message: str) -> list[Action]:
        if self._last_note.get(model) == message:
            return []
        self._last_note[model] = message
        return [Note(model, message)]
