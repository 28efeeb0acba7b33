"""The event bus: what happened to models and config generations, numbered, kept and fanned out.

The fleet and the rollout publish; the control API streams events as SSE
(``localllmctl events``, progress of ``load`` and ``apply``), and metrics
listen synchronously. Publishing never blocks: a subscriber that falls too
far behind is told so and dropped, the daemon never waits for it.

Event kinds are ``EventKind``'s members (stable; documented in the README, with their data).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from loguru import logger

from supervisor.core.stop_cause import StopCause

KEEP = 1000  # events kept for late subscribers (Last-Event-ID) and `localllmctl events`
SUBSCRIBER_BACKLOG = 1000  # events a slow subscriber may lag behind before it is dropped


class EventKind(StrEnum):
    """What happened; each kind's ``data`` keys are stable."""

    STATE = "state"  # a model's phase changed; from, to ("removed": left the catalog)
    LOAD = "load"  # a model became ready; seconds, container
    LOAD_FAILED = "load_failed"  # a start failed; error
    EVICT = "evict"  # stopped to make room (a swap), or evicted by Ollama on its own; reason, cause
    UNLOAD = "unload"  # stopped: idle, operator, config; reason, cause
    CRASH = "crash"  # died or hung while serving; reason
    RESTART = "restart"  # started after a failure; failures (consecutive)
    HEALTH_FAILURE = "health_failure"  # a liveness probe failed; failures, seen
    ADOPT = "adopt"  # a running container was adopted; container
    APPLY = "apply"  # a config generation's progress; generation, status, ...
    ROLLBACK = "rollback"  # a rollback was asked for; generation
    PULL = "pull"  # an Ollama model is being pulled; status, total, completed
    DEVICE = "device"  # a GPU became unusable, or usable again; device, uuid, problem (None: usable)
    MEMORY_WAIT = "memory_wait"  # a stopped model's GPU memory was not back in time; device, held, still_held,
    #                              expected, seconds
    PARTIAL_OFFLOAD = "partial_offload"  # Ollama put part of a model on the CPU; size_vram, size


def stop_event_kind(cause: StopCause) -> EventKind:
    """The kind a stop is published as: a crash, an eviction (ours or the server's own), else an unload."""
    return {StopCause.CRASH: EventKind.CRASH, StopCause.EVICT: EventKind.EVICT, StopCause.SERVER: EventKind.EVICT}.get(
        cause, EventKind.UNLOAD
    )


@dataclass(frozen=True)
class Event:
    id: int
    time: float  # wall clock
    kind: EventKind
    model: str | None
    message: str
    data: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {
            "id": self.id,
            "time": self.time,
            "kind": self.kind,
            "model": self.model,
            "message": self.message,
            "data": self.data,
        }


class Subscription:
    """An async iterator of events; ends when the bus drops it (too slow) or ``close`` is called."""

    def __init__(self, bus: EventBus):
        self._bus = bus
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(SUBSCRIBER_BACKLOG)
        self.overflowed = False

    def offer(self, event: Event) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            self._bus.unsubscribe(self)
            self._queue.get_nowait()  # room for the end marker
            self._queue.put_nowait(None)

    def close(self) -> None:
        self._bus.unsubscribe(self)
        if self._queue.full():
            self._queue.get_nowait()  # room for the end marker
        self._queue.put_nowait(None)

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        event = await self._queue.get()
        if event is None:
            raise StopAsyncIteration
        return event


class EventBus:
    def __init__(self, keep: int = KEEP):
        self._recent: deque[Event] = deque(maxlen=keep)
        self._next_id = 1
        self._subscribers: list[Subscription] = []
        self._listeners: list[Callable[[Event], None]] = []

    def publish(self, kind: EventKind, message: str, model: str | None = None, **data) -> Event:
        event = Event(self._next_id, time.time(), kind, model, message, data)
        self._next_id += 1
        self._recent.append(event)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must not break the caller halfway through its work
                logger.opt(exception=True).error("event listener failed on event {}", event.id)
        for subscriber in list(self._subscribers):
            subscriber.offer(event)
        return event

    def recent(self, after: int = 0, model: str | None = None) -> list[Event]:
        """Kept events newer than id ``after``, optionally only ``model``'s."""
        return [e for e in self._recent if e.id > after and (model is None or e.model == model)]

    def subscribe(self) -> Subscription:
        subscription = Subscription(self)
        self._subscribers.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)

    def close(self) -> None:
        """The daemon stops: every subscription ends."""
        for subscription in list(self._subscribers):
            subscription.close()

    def listen(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener`` synchronously for every event (metrics); it must not raise or block."""
        self._listeners.append(listener)

    @property
    def last_id(self) -> int:
        return self._next_id - 1
