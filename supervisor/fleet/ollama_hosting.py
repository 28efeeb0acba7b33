"""Models inside the one Ollama server: loaded and unloaded through its API, measured by what it reports.

The server container itself is ``OllamaHost``'s (started when a model needs it, replaced when its
spec changes, adopted after a daemon crash). Ollama loads one model at a time and may unload one
on its own; every call that waits on a load gets as long as a load may take.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from loguru import logger

from supervisor.config.settings import Config, ModelEntry
from supervisor.core.backends import ollama
from supervisor.core.containers import ContainerSpec, Endpoint
from supervisor.core.errors import LocalllmError, ModelStartFailed
from supervisor.core.slots import Phase
from supervisor.fleet.adoption import Wanted
from supervisor.fleet.events import EventKind
from supervisor.fleet.hosting import crash_report
from supervisor.fleet.instance import Instance, Spec
from supervisor.fleet.ollama_host import OllamaHost
from supervisor.runtime.container_runtime import ContainerInfo
from supervisor.runtime.health import probe
from supervisor.runtime.ollama_api import (
    context_from_show,
    embedding_only,
    estimate_from_show,
    find_loaded,
    memory_in_use,
    offload_of,
)

if TYPE_CHECKING:
    from supervisor.core.placement import Device
    from supervisor.fleet.owner import Fleet

PULL_EVENT_INTERVAL = 1.0  # seconds between pull progress events of one layer


class OllamaHosting:
    shared = True
    sizes_itself = True
    busy_status = 503  # Ollama's queue is full (OLLAMA_MAX_QUEUE): the client may try again
    server_label = ollama.SERVER_LABEL

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.server = OllamaHost(
            fleet.runtime, fleet.session, fleet.profile, fleet.endpoints.new, fleet.settings.stop_grace, self._device
        )
        self._poll: asyncio.Task | None = None
        self._estimated_in: str | None = None  # the server whose /api/show estimates were taken
        self._pull_reported: dict[str, tuple[str, float]] = {}  # model -> last pull status published, and when

    def _device(self, config: Config, model: str = "ollama") -> Device | None:
        """The device the Ollama server sees (``ollama.device``); None on the CPU."""
        fleet = self.fleet
        if not fleet.profile.has_gpus:
            return None
        wanted = ollama.device_id(config.ollama, fleet.profile)
        device = fleet.device(wanted)
        if device is None or device.gpu_request is None:
            known = ", ".join(d.id for d in fleet.scheduler.devices)
            raise ModelStartFailed(model, f"ollama.device {wanted} is not a GPU of this host ({known})")
        return device

    def devices(self, config: Config) -> tuple[str, ...]:
        return (ollama.device_id(config.ollama, self.fleet.profile),)

    def spec_for(
        self, entry: ModelEntry, endpoint: Endpoint, device_id: str | None, config: Config
    ) -> ollama.ModelSpec:
        return ollama.model_spec(entry, self.server.server_spec(config, endpoint, entry.name), device_id)

    def _patience(self, entry: ModelEntry | None = None) -> float:
        """How long an Ollama call may take that waits on a load (Ollama loads one model at a time)."""
        return (
            entry.startup_timeout if entry and entry.startup_timeout else None
        ) or self.fleet.settings.startup_timeout

    # -- a model's start and stop -------------------------------------------------------------

    async def start(self, instance: Instance, device_id: str | None) -> None:
        """Make sure the server runs, has the model (pulling it if allowed) and has it loaded."""
        fleet = self.fleet
        server, container_id = await self.server.ensure(fleet.config, instance.name)
        await self._estimate_for_admission(container_id)
        spec = ollama.model_spec(instance.entry, server, device_id)
        # Counted as in the server before the load is asked for: a load that fails, times out or is cancelled
        # may still complete inside Ollama, and the stop that follows must unload it (keep_alive 0).
        instance.spec, instance.container_id = spec, container_id
        await self._load(instance.entry, spec)
        try:  # /api/ps waits while Ollama loads another model: as long as a load may take
            loaded = await self.server.api(instance.name).loaded(self._patience(instance.entry))
        except LocalllmError:
            return  # measured at the next poll
        entry = find_loaded(loaded, instance.upstream_model)
        if entry is not None and fleet.profile.has_gpus and offload_of(entry)[0] == 0:
            raise ModelStartFailed(
                instance.name,
                (
                    f"Ollama loaded '{spec.tag}' entirely on the CPU (size_vram 0 of {offload_of(entry)[1]} "
                    f"bytes): its server does not see {spec.device}. Likely causes: the NVIDIA Container Toolkit "
                    "is not set up as a Docker runtime, or the driver is older than the Ollama image needs (the "
                    "server's log says)"
                ),
            )
        if entry is not None:
            self._observe(instance, entry)

    async def _load(self, entry: ModelEntry, spec: ollama.ModelSpec) -> None:
        """Pull if allowed, then load the tag as Ollama will serve it: with the Modelfile's own ``num_ctx`` when it
        sets one (a ``/v1`` request would otherwise reload it), and through ``/api/embed`` for an embedding model."""
        api, name = self.server.api(entry.name), entry.name
        if not await api.has(spec.tag):
            if not entry.pull:
                raise ModelStartFailed(
                    name,
                    f"the Ollama server has no '{spec.tag}', and pull is off for it "
                    "(set pull: true, or pull it into the server yourself)",
                )
            await api.pull(spec.tag, lambda line: self._pull_progress(name, spec.tag, line))
        show: dict = {}
        with contextlib.suppress(LocalllmError):
            show = await api.show(spec.tag)
        modelfile_context = context_from_show(show)
        instance = self.fleet.instances.get(name)
        guess = self._estimate_from_show(show, modelfile_context or spec.context) if show else None
        if guess and instance is not None and not entry.memory and instance.sizing.learned is None:
            instance.show_estimate = guess
        embedding = embedding_only(show)
        logger.bind(model=name).info(
            "loading '{}' into the Ollama server ({}{})",
            spec.tag,
            f"the Modelfile's context {modelfile_context}" if modelfile_context else f"context {spec.context}",
            ", an embedding model" if embedding else "",
        )
        deadline = self._patience(entry)
        try:
            async with asyncio.timeout(deadline):
                await api.load(spec.tag, None if modelfile_context else spec.context, embedding)
        except TimeoutError:
            raise ModelStartFailed(name, f"Ollama did not load '{spec.tag}' within {deadline:g}s") from None

    async def stop(self, instance: Instance, grace: float | None, crashed: bool) -> None:
        """Unload the model from the server. After a crash (dead or hung server) the server itself goes."""
        container_id = instance.container_id
        if container_id is None:
            return
        try:
            if crashed:
                await self._server_failed(container_id)
            else:
                await self._unload(instance.name, instance.upstream_model)
        finally:
            instance.forget_server(container_id)

    async def _unload(self, name: str, tag: str) -> None:
        container_id = self.server.container_id
        if container_id is None:
            return
        patience = self._patience(self.fleet.config.model_named(name))
        try:
            api = self.server.api(name)
            await api.unload(tag, timeout=patience)  # waits while Ollama finishes a load it is doing
            # keep_alive 0 only queues the unload: the runner goes after its requests, then Ollama waits for
            # the VRAM. Only then is the memory free for the next model.
            if not await api.wait_gone(tag, patience):
                logger.bind(model=name).warning("'{}' is still listed by Ollama {:g}s after its unload", tag, patience)
            logger.bind(model=name).info("unloaded '{}' from the Ollama server", tag)
        except LocalllmError as exc:
            if await self.server.running():
                raise LocalllmError(f"Ollama did not unload '{tag}': {exc.message}") from None
            await self._server_failed(container_id)

    async def _server_failed(self, container_id: str) -> None:
        """The Ollama server died or hangs: remove it, and every model still counted as ready in it crashed."""
        fleet = self.fleet
        for other in fleet.instances_of(self):
            if other.container_id == container_id and fleet.phase(other) is Phase.READY:
                fleet.crashed(other, "the Ollama server died or stopped answering")
        if self.server.container_id == container_id:
            logger.warning("removing the failed Ollama server {}", container_id[:12])
            await self.server.discard(0)

    async def crash_report(self, instance: Instance, reason: str) -> LocalllmError:
        return await crash_report(self.fleet.runtime, instance, reason)

    # -- config changes ------------------------------------------------------------------------

    async def launch(self, entry: ModelEntry, device_id: str | None, config: Config) -> tuple[Spec, str]:
        """A config change's Ollama model: loaded into the server for ``config`` (replaced if that changed).

        Its old self was taken offline first: Ollama holds one instance of a tag.
        """
        spec: ollama.ModelSpec | None = None
        try:
            server, container_id = await self.server.ensure(config, entry.name)
            spec = ollama.model_spec(entry, server, device_id)
            await self._load(entry, spec)
            return spec, container_id
        except BaseException:
            if spec is not None:  # a load that failed or timed out may still finish: never leave it loaded
                with contextlib.suppress(LocalllmError):
                    await self._unload(entry.name, spec.tag)
            raise

    async def abandon(self, name: str, spec: Spec, container_id: str) -> None:
        assert isinstance(spec, ollama.ModelSpec)
        await self._unload(name, spec.tag)

    def retire(self, name: str, container_id: str, patience: float, entry: ModelEntry) -> None:
        """Unload a model the catalog no longer has (or has changed) from the server; the server stays."""
        self.fleet.spawn(self._unload(name, entry.tag or name), f"retire:{name}")

    # -- measuring ---------------------------------------------------------------------------------

    async def _estimate_for_admission(self, container_id: str) -> None:
        """Once per server: ``/api/show``'s estimate replaces the placeholder need of every Ollama model that
        nothing was measured, learned or declared for, so the next admissions of them use it."""
        if self._estimated_in == container_id:
            return
        self._estimated_in = container_id
        fleet = self.fleet
        for instance in fleet.instances_of(self):
            if instance.entry.memory or instance.sizing.learned or instance.peak:
                continue
            try:
                show = await self.server.api(instance.name).show(instance.upstream_model)
            except LocalllmError:
                continue  # not in the server yet (a pull comes with its start)
            guess = self._estimate_from_show(show, context_from_show(show) or instance.sizing.launch.context)
            if guess:
                instance.show_estimate = guess
                if fleet.scheduler.view(instance.name).phase in (Phase.STOPPED, Phase.FAILED):
                    fleet.measuring.set_need(instance.name, guess)

    def _estimate_from_show(self, show: dict, context: int) -> int | None:
        """Ollama's own sizing, from ``/api/show``: every slot's KV cache, in the server's cache type."""
        settings = self.fleet.config.ollama
        return estimate_from_show(show, context, settings.num_parallel, settings.env.get("OLLAMA_KV_CACHE_TYPE", "f16"))

    async def estimate(self, instance: Instance) -> dict | None:
        """``/api/show``'s estimate for a model nothing declares a size for, while the server runs."""
        if instance.sizing.declared or self.server.container_id is None:
            return None
        try:
            show = await self.server.api(instance.name).show(instance.upstream_model)
        except LocalllmError as exc:
            return {"problem": exc.message}
        instance.show_estimate = (
            self._estimate_from_show(show, instance.sizing.launch.context) or instance.show_estimate
        )
        return {"details": show.get("details"), "estimate": instance.show_estimate}

    def _pull_progress(self, name: str, tag: str, line: dict) -> None:
        """One ``pull`` event per status, and at most one a second while a layer downloads (Ollama sends many)."""
        status = str(line.get("status", ""))
        total, completed = line.get("total"), line.get("completed")
        last_status, last_time = self._pull_reported.get(name, ("", 0.0))
        now = time.monotonic()
        if status == last_status and now - last_time < PULL_EVENT_INTERVAL and completed != total:
            return
        self._pull_reported[name] = (status, now)
        share = f" {100 * completed / total:.0f}%" if total and completed is not None else ""
        self.fleet.events.publish(
            EventKind.PULL, f"pulling {tag}: {status}{share}", name, status=status, total=total, completed=completed
        )

    def _observe(self, instance: Instance, entry: dict) -> None:
        """What ``/api/ps`` says the loaded model uses: its size where it is budgeted, and a partial offload."""
        fleet = self.fleet
        size_vram, size = offload_of(entry)
        partial = (size_vram, size) if fleet.profile.has_gpus and 0 < size_vram < size else None
        reported, instance.offload = instance.offload, partial
        if partial and not reported:
            message = (
                f"Ollama put part of '{instance.upstream_model}' on the CPU: {size_vram // 2**20} MiB of "
                f"{size // 2**20} MiB on the GPU (it thought too little was free); it runs slower"
            )
            logger.bind(model=instance.name).warning("{}", message)
            fleet.events.publish(EventKind.PARTIAL_OFFLOAD, message, instance.name, size_vram=size_vram, size=size)
        measured = memory_in_use(entry, fleet.profile.has_gpus)
        if measured:
            fleet.measuring.observe(instance, measured)

    async def observe(self) -> None:
        """Each tick, unless the last poll still runs (Ollama's /api/ps waits while a model loads)."""
        if self._poll is not None and not self._poll.done():
            return
        fleet = self.fleet
        if self.server.container_id is None or not any(fleet.phase(i) is Phase.READY for i in fleet.instances_of(self)):
            return
        self._poll = fleet.spawn(self._poll_loaded(), "poll:ollama")

    async def _poll_loaded(self) -> None:
        """What Ollama has loaded now: a model it unloaded on its own (evicted, or its runner exited) is
        shown as stopped, and each loaded one's size is measured for its peak."""
        fleet = self.fleet
        asked_at = time.time()
        try:
            loaded = await self.server.api("ollama").loaded()
        except LocalllmError:
            return  # a dead or hung server is the liveness probe's to find
        for instance in [i for i in fleet.instances_of(self) if fleet.phase(i) is Phase.READY]:
            if instance.container_id != self.server.container_id or (instance.ready_at or 0) > asked_at:
                continue  # not in this server, or loaded after we asked
            entry = find_loaded(loaded, instance.upstream_model)
            if entry is not None:
                self._observe(instance, entry)
                continue
            fleet.server_dropped(
                instance, "evicted by Ollama: it unloaded the model on its own (for room, or its runner exited)"
            )

    # -- adoption ------------------------------------------------------------------------------------

    def wanted(self, info: ContainerInfo, endpoint: Endpoint, config: Config) -> Wanted:
        try:
            return Wanted(spec=self.server.server_spec(config, endpoint))
        except LocalllmError as exc:
            return Wanted(problem=exc.message)

    async def adopt(self, info: ContainerInfo, spec: Spec, instance: Instance | None) -> str | None:
        """Take the Ollama server once it answers, then the catalog's models it has loaded; or say why not."""
        fleet = self.fleet
        if instance is not None or not isinstance(spec, ContainerSpec):
            return "a model's container of its own: Ollama models live in the server"
        if await probe(fleet.session, spec.endpoint.url + ollama.readiness_path, timeout=2.0) != 200:
            return "its server is not healthy"
        self.server.adopt(spec, info.id)
        logger.info("adopted the running Ollama server {} ({})", info.name, spec.endpoint)
        fleet.events.publish(
            EventKind.ADOPT, f"adopted the running Ollama server {info.name}", None, container=info.id[:12]
        )
        try:
            loaded = await self.server.api("ollama").loaded(self._patience())
        except LocalllmError as exc:
            logger.warning("cannot list the Ollama server's loaded models: {}", exc.message)
            return None
        adopted = set()
        for model in fleet.instances_of(self):
            entry = find_loaded(loaded, model.upstream_model)
            if entry is None:
                continue
            measured = memory_in_use(entry, fleet.profile.has_gpus)
            if measured and not model.entry.memory:
                fleet.measuring.set_need(model.name, measured)  # admitted with what it uses
            if fleet.admit_adopted(model, ollama.model_spec(model.entry, spec, spec.device), info.id):
                model.measured = measured
                adopted.add(entry["name"])
                logger.bind(model=model.name).info("adopted: loaded in the Ollama server")
                fleet.events.publish(
                    EventKind.ADOPT, "adopted: loaded in the Ollama server", model.name, container=info.id[:12]
                )
        for tag in set(loaded) - adopted:  # not in the catalog, or over budget: nobody would account for it
            logger.warning("unloading '{}' from the adopted Ollama server: no catalog model holds it", tag)
            with contextlib.suppress(LocalllmError):
                await self._unload("ollama", tag)
        return None

    # -- what is its own -----------------------------------------------------------------------------

    def replaces_server(self, config: Config) -> bool:
        return config.ollama != self.fleet.config.ollama

    def endpoints(self) -> set[str]:
        spec = self.server.spec
        return {spec.endpoint.socket} if spec is not None and spec.endpoint.socket else set()

    def containers(self) -> set[str]:
        return {self.server.container_id} if self.server.container_id else set()

    async def shutdown(self) -> None:
        """The server goes as a whole: no need to unload its models one by one."""
        for instance in self.fleet.instances_of(self):
            instance.forget_server(instance.container_id)
        with contextlib.suppress(LocalllmError):
            await self.server.discard()
