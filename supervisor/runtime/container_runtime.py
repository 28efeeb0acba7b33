"""What the fleet needs from a container engine, written down: the ``ContainerRuntime`` protocol.

``docker_runtime.DockerRuntime`` is the implementation on a local Docker engine, and the only
module that imports ``docker``; the owner's unit tests drive the fleet with a recording fake
(``tests/unit/fleet_harness.py``). A runtime for another place (a Swarm service on another node)
implements the same methods. Everything here is the project's own data: no engine's types or
exceptions cross this line, only ``ContainerInfo`` and the errors of ``errors.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from supervisor.core.containers import ContainerSpec


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    status: str  # created, running, paused, restarting, exited, dead
    exit_code: int | None
    oom_killed: bool
    labels: dict[str, str]

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def exited(self) -> bool:
        return self.status in ("exited", "dead")


class ContainerRuntime(Protocol):
    async def ping(self) -> None:
        """Return when the engine answers; raise DockerUnavailable otherwise."""

    async def run(self, spec: ContainerSpec) -> ContainerInfo:
        """Create and start the container of ``spec`` (replacing a stale one of ours by its name).

        Cancellation-safe: cancelled while the engine works, it waits for the engine's answer and
        removes what was made, so that no container is ever left behind unknown.
        """

    async def inspect(self, container_id: str) -> ContainerInfo | None:
        """The container's state now; None when it no longer exists."""

    async def stop_and_remove(self, container_id: str, grace: float) -> None:
        """SIGTERM, up to ``grace`` seconds, SIGKILL, then remove; gone already is fine."""

    async def logs_tail(self, container_id: str, lines: int = 40) -> str:
        """The container's last ``lines`` of output ("" when there is none, or it is gone)."""

    def logs_stream(self, container_id: str, tail: int, follow: bool) -> AsyncIterator[bytes]:
        """The container's output from ``tail`` lines back, and what follows while ``follow``."""

    async def list_labelled(self, labels: dict[str, str]) -> list[ContainerInfo]:
        """Every container, running or not, carrying all of ``labels``."""

    async def remove_networks(self, owner: str) -> None:
        """Remove the networks ``owner`` made that no container uses any more."""
