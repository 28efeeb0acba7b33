"""A catalog model as the fleet knows it while it runs, and a request's claim on one."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from supervisor.config.settings import ModelEntry
from supervisor.core.backends.ollama import ModelSpec
from supervisor.core.containers import ContainerSpec
from supervisor.fleet.sizing import Sizing

Spec = ContainerSpec | ModelSpec  # what a model runs as: a container of its own, or a model in a shared server


@dataclass
class Instance:
    """One catalog model and the server serving it, if any (its own container, or a shared server)."""

    entry: ModelEntry
    sizing: Sizing
    spec: Spec | None = None
    container_id: str | None = None  # the container serving it (a shared server's, for a model inside one)
    ready_at: float | None = None  # wall clock
    last_used: float | None = None  # wall clock
    load_seconds: float | None = None
    error: str | None = None
    measured: int | None = None  # GPU bytes it uses now (Ollama: what /api/ps reports), on the last look
    peak: int | None = None  # the most it used in this run
    served: int = 0  # requests granted in this run: a run that served none does not teach a lower size
    failed_probes: int = 0
    show_estimate: int | None = None  # Ollama: estimated from /api/show
    offload: tuple[int, int] | None = None  # Ollama: (size_vram, size) while part of it is on the CPU

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def base_url(self) -> str:
        assert self.spec is not None, "base_url of a model without a server"
        return self.spec.endpoint.url

    @property
    def upstream_model(self) -> str:
        """The name its server knows it by: its tag (an Ollama model), else the catalog name (llama-server's alias)."""
        return self.entry.tag or self.entry.name

    def forget_server(self, container_id: str | None) -> None:
        """The server it ran in is gone (or it left the server): no container, spec or reading any more."""
        if self.container_id == container_id:
            self.container_id, self.spec, self.measured = None, None, None


@dataclass
class Reservation:
    """A request's claim on a model: ``granted`` resolves once the model is ready for it."""

    instance: Instance
    ticket: int
    granted: asyncio.Future
    released: bool = field(default=False)
