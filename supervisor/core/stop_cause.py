"""Why a model's server is stopped: the cause a scheduler ``Stop`` carries, and an ``unload`` or ``evict`` event's
``cause``. Pure vocabulary, for the scheduler (which decides stops) and the observers (events, metrics); the values
are part of the event stream and the metrics (README: Events, Metrics).
"""

from __future__ import annotations

from enum import StrEnum


class StopCause(StrEnum):
    UNLOAD = "unload"  # an operator, or a config change
    IDLE = "idle"  # unused for longer than its TTL
    EVICT = "evict"  # room for another model (a swap)
    CRASH = "crash"  # its server died or hung: keep its last words, no grace period
    SERVER = "server"  # the server unloaded it on its own: Ollama evicted it, or its runner exited
