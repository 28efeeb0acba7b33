"""The fleet: the single owner of live model state.

Every change to a model's state happens in a method of ``Fleet``, on the
event loop, with no ``await`` between deciding and recording the decision.
Slow work (starting a container, waiting for readiness, stopping) runs in a
task per model; concurrent callers wanting the same model join that task
(single flight) instead of starting another.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass, field
from enum import StrEnum

import aiohttp
from loguru import logger

from .backends import backend_for
from .config import Config, ModelEntry
from .containers import LABEL_OWNER, ContainerSpec
from .docker_runtime import DockerRuntime
from .errors import LocalllmError, ModelStartFailed, ShuttingDown, UnknownModel, describe_exit
from .health import wait_until_ready
from .placement import free_ports
from .profiles import Profile


class ModelState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


@dataclass
class Instance:
    """One catalog model and what is running for it right now."""

    entry: ModelEntry
    state: ModelState = ModelState.STOPPED
    spec: ContainerSpec | None = None
    container_id: str | None = None
    ready_at: float | None = None  # wall clock
    last_used: float | None = None  # wall clock
    in_flight: int = 0
    error: str | None = None
    load_seconds: float | None = None
    loading: asyncio.Task | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def port(self) -> int | None:
        return self.spec.port if self.spec else None

    @property
    def base_url(self) -> str:
        assert self.spec is not None, "base_url of a model without a container"
        return backend_for(self.entry.backend).base_url(self.spec.port)

    def snapshot(self) -> dict:
        return {
            "name": self.name,
            "aliases": list(self.entry.aliases),
            "backend": self.entry.backend,
            "state": str(self.state),
            "container": self.container_id[:12] if self.container_id else None,
            "port": self.port,
            "preload": self.entry.preload,
            "pinned": self.entry.pinned,
            "in_flight": self.in_flight,
            "last_used": self.last_used,
            "ready_at": self.ready_at,
            "load_seconds": self.load_seconds,
            "error": self.error,
        }


class Fleet:
    def __init__(self, config: Config, profile: Profile, runtime: DockerRuntime, session: aiohttp.ClientSession):
        self.config = config
        self.profile = profile
        self.runtime = runtime
        self.session = session
        self.settings = config.daemon
        self.instances: dict[str, Instance] = {entry.name: Instance(entry) for entry in config.models}
        self._by_name = {name: self.instances[entry.name] for entry in config.models for name in entry.names}
        self._closing = False

    # -- lookups ----------------------------------------------------------

    def resolve(self, name: str) -> Instance:
        instance = self._by_name.get(name)
        if instance is None:
            raise UnknownModel(name, list(self.instances))
        return instance

    def snapshot(self) -> list[dict]:
        return [instance.snapshot() for instance in self.instances.values()]

    # -- requests ---------------------------------------------------------

    async def ensure_ready(self, name: str) -> Instance:
        """The model's instance once it can serve; starts it if needed, joining a start under way."""
        instance = self.resolve(name)
        if self._closing:
            raise ShuttingDown("localllmd is shutting down")
        if instance.state is ModelState.READY:
            return instance
        if instance.loading is None or instance.loading.done():
            instance.loading = asyncio.create_task(self._start(instance), name=f"start:{instance.name}")
            instance.loading.add_done_callback(_retrieve_outcome)
        await asyncio.shield(instance.loading)
        return instance

    @contextlib.contextmanager
    def serving(self, instance: Instance):
        """Count a request in flight for ``instance`` while the block runs."""
        instance.in_flight += 1
        instance.last_used = time.time()
        try:
            yield instance
        finally:
            instance.in_flight -= 1
            instance.last_used = time.time()

    async def note_upstream_failure(self, instance: Instance) -> None:
        """A request could not reach the model's server: if its container died, record why."""
        if instance.state is not ModelState.READY or instance.container_id is None:
            return
        container_id = instance.container_id
        info = await self.runtime.inspect(container_id)
        if info is not None and info.running:
            return
        if instance.container_id != container_id or instance.state is not ModelState.READY:
            return  # someone else already acted on it
        logs = await self.runtime.logs_tail(container_id) if info else ""
        instance.error = describe_exit("server exited while serving", info.exit_code if info else None, logs)
        logger.bind(model=instance.name).error("{}", instance.error)
        self._set(instance, ModelState.FAILED)
        await self._discard_container(instance)

    # -- lifecycle --------------------------------------------------------

    async def remove_leftovers(self) -> int:
        """Remove containers a previous run of this instance left behind; returns how many."""
        leftovers = await self.runtime.list_labelled({LABEL_OWNER: self.settings.instance})
        for info in leftovers:
            logger.warning("removing container {} ({}): ours, but no model owns it", info.name, info.status)
            await self.runtime.stop_and_remove(info.id, self.settings.stop_grace)
        return len(leftovers)

    async def preload(self) -> None:
        """Start every ``preload`` model; a failure is logged and leaves the others running."""
        names = [entry.name for entry in self.config.models if entry.preload]
        results = await asyncio.gather(*(self.ensure_ready(name) for name in names), return_exceptions=True)
        for name, result in zip(names, results):
            if isinstance(result, LocalllmError):
                logger.bind(model=name).error("preload of {} failed: {}", name, result.message)
            elif isinstance(result, BaseException):
                logger.bind(model=name).opt(exception=result).error("preload of {} crashed", name)

    async def unload(self, name: str) -> None:
        instance = self.resolve(name)
        if instance.loading is not None and not instance.loading.done():
            instance.loading.cancel()
            with contextlib.suppress(BaseException):
                await instance.loading
        await self._stop(instance)

    async def shutdown(self) -> None:
        """Refuse new work, cancel starts under way, stop and remove every container we run."""
        self._closing = True
        starting = [i.loading for i in self.instances.values() if i.loading and not i.loading.done()]
        for task in starting:
            task.cancel()
        await asyncio.gather(*starting, return_exceptions=True)
        await asyncio.gather(*(self._stop(i) for i in self.instances.values()), return_exceptions=True)
        await self.remove_leftovers()  # anything a cancelled start created behind our back

    # -- the slow work, one task per model ----------------------------------

    async def _start(self, instance: Instance) -> None:
        log = logger.bind(model=instance.name)
        instance.error = None
        self._set(instance, ModelState.STARTING)
        started = time.monotonic()
        try:
            if not instance.entry.gguf.is_file():
                raise ModelStartFailed(instance.name, f"model file {instance.entry.gguf} does not exist")
            backend = backend_for(instance.entry.backend)
            spec = backend.container_spec(instance.entry, self.profile, self.settings, self._allocate_port(instance))
            instance.spec = spec
            info = await self._create_container(instance, spec)
            log.info("started container {} on port {}", info.name, spec.port)
            await wait_until_ready(
                self.runtime,
                self.session,
                model=instance.name,
                container_id=info.id,
                url=backend.base_url(spec.port) + backend.readiness_path,
                deadline=instance.entry.startup_timeout or self.settings.startup_timeout,
            )
        except asyncio.CancelledError:
            await self._discard_container(instance)
            self._set(instance, ModelState.STOPPED)
            raise
        except LocalllmError as exc:
            await self._discard_container(instance)
            instance.error = exc.message
            self._set(instance, ModelState.FAILED)
            log.error("start failed: {}", exc.message)
            raise
        instance.load_seconds = time.monotonic() - started
        instance.ready_at = time.time()
        self._set(instance, ModelState.READY)
        log.info("ready in {:.2f}s", instance.load_seconds)

    async def _create_container(self, instance: Instance, spec: ContainerSpec):
        """Create and start; a cancellation waits for the engine's answer so the container is never lost."""
        creating = asyncio.ensure_future(self.runtime.run(spec))
        try:
            info = await asyncio.shield(creating)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                instance.container_id = (await creating).id
            raise
        instance.container_id = info.id
        return info

    async def _stop(self, instance: Instance) -> None:
        if instance.container_id is None:
            if instance.state is not ModelState.FAILED:
                self._set(instance, ModelState.STOPPED)
            return
        self._set(instance, ModelState.STOPPING)
        await self._discard_container(instance)
        self._set(instance, ModelState.STOPPED)

    async def _discard_container(self, instance: Instance) -> None:
        container_id, instance.container_id = instance.container_id, None
        instance.spec = None
        if container_id is not None:
            await self.runtime.stop_and_remove(container_id, self.settings.stop_grace)
            logger.bind(model=instance.name).info("container {} stopped and removed", container_id[:12])

    def _allocate_port(self, instance: Instance) -> int:
        taken = {i.port for i in self.instances.values() if i.port is not None}
        for port in free_ports(self.settings.port_range, taken):
            if _port_is_free(port):
                return port
        low, high = self.settings.port_range
        raise ModelStartFailed(instance.name, f"no free port left in port_range {low}-{high}")

    def _set(self, instance: Instance, state: ModelState) -> None:
        if instance.state is not state:
            logger.bind(model=instance.name).debug("{} -> {}", instance.state, state)
            instance.state = state


def _retrieve_outcome(task: asyncio.Task) -> None:
    """A start whose waiters all went away still has its error read (and logged in ``_start``)."""
    if not task.cancelled():
        task.exception()


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe_socket:
        probe_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe_socket.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
