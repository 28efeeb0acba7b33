"""How a model is hosted: the interface the fleet drives, whatever the kind of hosting.

Two kinds today: ``ContainerHosting`` (one container per model: llama.cpp) and
``OllamaHosting`` (models loaded into the one Ollama server). The fleet picks a model's
hosting by its backend (``Fleet.hosting_of``) and never asks which kind it has. A third kind
(say, a Swarm service on another node) implements ``Hosting`` and is registered in
``Fleet.__init__``: neither the scheduler nor the fleet's request path changes.

Every call runs on the event loop and reports through the fleet's entry points
(``crashed``, ``observe``, ``set_measured_need``, ``server_dropped``): a hosting never
touches the scheduler.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from supervisor.config.settings import Config, ModelEntry
from supervisor.core.containers import Endpoint, servers_dir
from supervisor.core.errors import LocalllmError, ModelStartFailed, UpstreamFailed, describe_exit
from supervisor.fleet.adoption import Wanted
from supervisor.fleet.instance import Instance, Spec
from supervisor.runtime.container_runtime import ContainerInfo, ContainerRuntime
from supervisor.runtime.upstream import make_socket_dir, server_user, sweep_socket_dirs

if TYPE_CHECKING:
    pass


class Hosting(Protocol):
    """What the fleet asks of a kind of hosting."""

    shared: bool  # its models share one server: a change to one reloads it there; a stop frees only its part
    sizes_itself: bool  # its server reports what a loaded model uses, and that beats the placeholder need
    busy_status: int | None  # the upstream HTTP status that means "queue full, try again", not a failure
    server_label: str | None  # the model label of its own server container (adopted as such), if it has one

    def devices(self, config: Config) -> tuple[str, ...]:
        """The devices its models may be placed on under ``config``; () for any."""

    def spec_for(self, entry: ModelEntry, endpoint: Endpoint, device_id: str | None, config: Config) -> Spec:
        """What ``entry`` runs as under ``config``, reached at ``endpoint``, on ``device_id``."""

    async def start(self, instance: Instance, device_id: str | None) -> None:
        """Bring the model up and through its readiness gate; ``instance.container_id`` is set as soon as there is
        one, so that a start that fails or is cancelled can be stopped."""

    async def stop(self, instance: Instance, grace: float | None, crashed: bool) -> None:
        """Take the model down (``grace`` seconds for its server, None: the configured grace); after a crash
        its server may be dead or hung. The instance forgets its server once it is gone."""

    async def launch(self, entry: ModelEntry, device_id: str | None, config: Config) -> tuple[Spec, str]:
        """A config change: start ``entry`` beside whatever runs, gated; (its spec, its container id)."""

    async def abandon(self, name: str, spec: Spec, container_id: str) -> None:
        """Remove what ``launch`` started but a config change will not use."""

    def retire(self, name: str, container_id: str, patience: float, entry: ModelEntry) -> None:
        """In the background: stop what served ``entry`` once its requests are done (``patience`` seconds)."""

    async def crash_report(self, instance: Instance, reason: str) -> LocalllmError:
        """What a crashed model's failure says: the reason, its server's exit code and last lines."""

    async def observe(self) -> None:
        """Each tick: what its ready models use now (``Fleet.observe``), and models its server let go."""

    async def estimate(self, instance: Instance) -> dict | None:
        """More on what the model needs, asked of its server (``localllmctl memory``); None: nothing more."""

    def wanted(self, info: ContainerInfo, endpoint: Endpoint, config: Config) -> Wanted:
        """What its own server container (labelled ``server_label``) found at start-up should be."""

    async def adopt(self, info: ContainerInfo, spec: Spec, instance: Instance | None) -> str | None:
        """Take a found container as a model's (``instance``) or as its own server (None); or say why not."""

    def replaces_server(self, config: Config) -> bool:
        """Whether applying ``config`` replaces a server of its own: its models are then held during the change."""

    def endpoints(self) -> set[str]:
        """The sockets of servers of its own (beyond its models' specs): never swept."""

    def containers(self) -> set[str]:
        """The ids of containers of its own (beyond its models'): never swept."""

    async def shutdown(self) -> None:
        """Everything of its own goes (the models were stopped before)."""


async def crash_report(runtime: ContainerRuntime, instance: Instance, reason: str) -> LocalllmError:
    """The failure of a model whose container (its own, or the shared server's) exited or hung."""
    container_id = instance.container_id
    info = await runtime.inspect(container_id) if container_id else None
    logs = await runtime.logs_tail(container_id) if container_id else ""
    return UpstreamFailed(describe_exit(reason, info.exit_code if info else None, logs))


class EndpointPool:
    """Fresh socket endpoints for every kind of hosting, each in a private directory under ``servers/``.

    ``in_use`` says which sockets are live; directories of the others are removed as new ones are made.
    """

    def __init__(self, state_dir: Path, in_use: Callable[[], set[str]]):
        self.servers = servers_dir(state_dir)
        self.in_use = in_use

    def new(self, model: str, user: tuple[int, int] | None = None) -> Endpoint:
        """A socket endpoint for a server running as ``user`` (default: the llama.cpp servers' user)."""
        endpoint = Endpoint(socket=secrets.token_hex(8))
        try:
            sweep_socket_dirs(self.servers, self.in_use())
            make_socket_dir(self.servers, endpoint, user or server_user())
        except OSError as exc:
            raise ModelStartFailed(
                model, f"cannot make the directory for its socket in {self.servers}: {exc.strerror or exc}"
            ) from None
        return endpoint
