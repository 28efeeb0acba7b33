"""The scheduler's vocabulary: phases, the actions it returns, a model's slot, its limits and its views.

Plain data; ``scheduler.py`` is the machine that works on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from supervisor.core.errors import LocalllmError
from supervisor.core.stop_cause import StopCause

if TYPE_CHECKING:
    from supervisor.config.settings import DaemonSettings


class Phase(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


# Every phase change the scheduler makes, and why; ``Scheduler._move`` refuses any other.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.STOPPED: frozenset({Phase.STARTING, Phase.READY}),  # admitted; adopted (a found or launched server)
    Phase.STARTING: frozenset({Phase.READY, Phase.FAILED}),  # its start's outcome
    Phase.READY: frozenset({Phase.STOPPING}),  # idle, evicted, unloaded, crashed
    Phase.STOPPING: frozenset({Phase.STOPPED, Phase.FAILED}),  # gone; gone after a crash (or a failed stop)
    Phase.FAILED: frozenset({Phase.STARTING, Phase.STOPPED}),  # restarted after its backoff; cleared by an operator
}


class IllegalTransition(AssertionError):
    """A phase change outside ``TRANSITIONS``: a bug in the scheduler, never a user's error."""


@dataclass(frozen=True)
class Moved:
    """One phase change, as made: the fleet publishes each as a ``state`` event."""

    model: str
    before: Phase
    after: Phase


# -- actions -------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    model: str
    device: str
    reason: str


@dataclass(frozen=True)
class Stop:
    model: str
    reason: str
    cause: StopCause = StopCause.UNLOAD

    @property
    def crashed(self) -> bool:
        """The server died or hung: keep its last words, no grace period."""
        return self.cause == StopCause.CRASH


@dataclass(frozen=True)
class Grant:
    ticket: int
    model: str


@dataclass(frozen=True)
class Reject:
    ticket: int
    model: str
    error: LocalllmError


@dataclass(frozen=True)
class Note:
    """A decision worth one log line (a wait, and why)."""

    model: str
    message: str


Action = Start | Stop | Grant | Reject | Note


# -- state ---------------------------------------------------------------------


@dataclass
class ModelSlot:
    name: str
    need: int
    pinned: bool = False
    ttl: float | None = None
    phase: Phase = Phase.STOPPED
    device: str | None = None
    in_flight: int = 0
    last_used: float = 0.0
    loaded_at: float = 0.0
    draining: bool = False
    awaiting: set[str] = field(default_factory=set)  # evictions this start waits for
    start_sent: bool = False
    error: LocalllmError | None = None
    wanted: bool = False  # should run even without requests: preloaded, or it was running when it failed
    failures: int = 0  # consecutive failed starts or crashes
    retry_at: float = 0.0  # no start before this (backoff)
    gave_up: bool = False  # failed max_failures times: no more starts until reset
    held: bool = False  # a config change is replacing it: no starts from the queue meanwhile
    handover: int = 0  # a config change takes it offline for its next version: the room it frees, kept for that
    devices: tuple[str, ...] = ()  # the devices it may be placed on; empty: any

    @property
    def holds_memory(self) -> bool:
        return self.phase in (Phase.STARTING, Phase.READY, Phase.STOPPING)


@dataclass(frozen=True)
class Ticket:
    id: int
    model: str
    since: float


@dataclass(frozen=True)
class Limits:
    max_queue: int = 256
    queue_timeout: float = 600.0
    min_residency: float = 10.0
    restart_delay: float = 1.0  # first delay after a failure; doubles each time...
    restart_max_delay: float = 60.0  # ...up to this
    stable_after: float = 60.0  # a model that ran this long before failing starts counting afresh
    max_failures: int = 5  # consecutive failures before the model is marked failed for good

    @classmethod
    def from_settings(cls, settings: DaemonSettings) -> Limits:
        restart = settings.restart
        return cls(
            settings.max_queue,
            settings.queue_timeout,
            settings.min_residency,
            restart.delay,
            restart.max_delay,
            restart.stable_after,
            restart.max_failures,
        )

    def restart_delay_after(self, failures: int) -> float:
        return min(self.restart_max_delay, self.restart_delay * 2.0 ** (failures - 1))


@dataclass(frozen=True)
class SlotView:
    """What others may know of a model's slot, as it is now: read, never written (the scheduler owns it)."""

    phase: Phase
    device: str | None
    need: int
    in_flight: int
    waiting: int  # requests queued for it
    held: bool
    error: LocalllmError | None
    ttl: float | None = None
    failures: int = 0  # consecutive failed starts or crashes
    gave_up: bool = False
