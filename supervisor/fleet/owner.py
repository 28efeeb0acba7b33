"""The fleet: the single owner of live model state, and the hands of the scheduler.

``Scheduler`` (pure) decides; ``Fleet`` feeds it events and carries out its
actions: starting and stopping containers, granting or rejecting waiting
requests. Everything runs on the event loop; every scheduler call and the
application of its actions happen with no ``await`` in between, so no lock
is needed. Slow work (a container start and its readiness gate, a stop and
the wait for memory to come back) runs as a task whose outcome returns to
the scheduler as an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
from loguru import logger

from supervisor.config.policy import escapes
from supervisor.config.profiles import Profile
from supervisor.config.settings import Config, DaemonSettings, ModelEntry
from supervisor.core.backends import backend_for, ollama
from supervisor.core.containers import (
    LABEL_DEVICE,
    LABEL_ENDPOINT,
    LABEL_MODEL,
    LABEL_OWNER,
    ContainerSpec,
    Endpoint,
    servers_dir,
)
from supervisor.core.errors import (
    Conflict,
    LocalllmError,
    ModelBusy,
    ModelNotRunning,
    ModelStartFailed,
    ModelStayedBusy,
    ShuttingDown,
    UnknownModel,
    UpstreamFailed,
    describe_exit,
)
from supervisor.core.placement import Device, GpuReading, devices_for
from supervisor.core.scheduler import (
    Action,
    Grant,
    Limits,
    ModelSlot,
    Note,
    Phase,
    Reject,
    Scheduler,
    Start,
    Stop,
)
from supervisor.core.stop_cause import StopCause
from supervisor.fleet import adoption
from supervisor.fleet.events import EventBus, EventKind, stop_event_kind
from supervisor.fleet.gpu_meter import GpuMeter
from supervisor.fleet.liveness import Watch
from supervisor.fleet.ollama_host import OllamaHost
from supervisor.fleet.sizing import Sizing, size_model
from supervisor.runtime.container_runtime import ContainerInfo, ContainerRuntime
from supervisor.runtime.gpu_watch import GpuWatch
from supervisor.runtime.health import probe, wait_until_ready
from supervisor.runtime.ollama_api import (
    context_from_show,
    embedding_only,
    estimate_from_show,
    find_loaded,
    memory_in_use,
    offload_of,
)
from supervisor.runtime.upstream import make_socket_dir, server_user, sweep_socket_dirs
from supervisor.state.learned import LearnedSizes

DISCARD_ATTEMPTS = 3
PULL_EVENT_INTERVAL = 1.0  # seconds between pull progress events of one layer


@dataclass
class Instance:
    """One catalog model and the container serving it, if any."""

    entry: ModelEntry
    sizing: Sizing
    spec: ContainerSpec | None = None
    container_id: str | None = None
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
        assert self.spec is not None, "base_url of a model without a container"
        return self.spec.endpoint.url

    @property
    def in_ollama(self) -> bool:
        """Served inside the shared Ollama server (not a container of its own)."""
        return self.entry.backend == "ollama"

    @property
    def upstream_model(self) -> str:
        """The name the server knows the model by: its Ollama tag, or the catalog name (llama-server's alias)."""
        return self.entry.tag if self.in_ollama and self.entry.tag else self.entry.name


@dataclass
class Reservation:
    """A request's claim on a model: ``granted`` resolves once the model is ready for it."""

    instance: Instance
    ticket: int
    granted: asyncio.Future
    released: bool = field(default=False)


def limits_for(settings: DaemonSettings) -> Limits:
    restart = settings.restart
    return Limits(settings.max_queue, settings.queue_timeout, settings.min_residency,
                  restart.delay, restart.max_delay, restart.stable_after, restart.max_failures)


class Fleet:
    def __init__(self, config: Config, profile: Profile, runtime: ContainerRuntime, session: aiohttp.ClientSession,
                 sizings: dict[str, Sizing], learned: LearnedSizes | None = None,
                 gpu_readings: list[GpuReading] | None = None, events: EventBus | None = None,
                 gpu: GpuWatch | None = None):
        self.config = config
        self.events = events or EventBus()
        self.profile = profile
        self.runtime = runtime
        self.session = session
        self.settings = config.daemon
        self.instances = {e.name: Instance(e, sizings[e.name]) for e in config.models}
        self._by_name = {name: self.instances[e.name] for e in config.models for name in e.names}
        self.scheduler = Scheduler(
            devices_for(profile, gpu_readings),
            [self._slot_for(e, sizings[e.name]) for e in config.models],
            limits_for(self.settings),
        )
        # NVML, on a GPU host where it works: readings, peaks, learning, memory waits; absent otherwise
        self.meter = GpuMeter(gpu, learned, self.events, profile, self.scheduler.devices) if gpu else None
        self._waiters: dict[int, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._wakeup: asyncio.TimerHandle | None = None
        self._wakeup_at = 0.0
        self._users: Counter[str] = Counter()  # requests in flight per container id
        self._launching: dict[Endpoint, str] = {}  # endpoints of containers a config change is starting
        self._protected: set[str] = set()  # containers a config change launched or retires: never swept
        self.degraded: str | None = None  # why the last config change could not even be reverted
        self.engine_problem: str | None = None  # set while the Docker engine does not answer
        self.watch = Watch(self)  # liveness probes and the engine watch; crashes come back through crashed()
        self.ollama = OllamaHost(runtime, session, profile, self._new_socket, self.settings.stop_grace,
                                 self._ollama_device)
        self._operations: dict[str, str] = {}  # model -> the operator's load or unload in progress
        self._pull_reported: dict[str, tuple[str, float]] = {}  # model -> last pull status published, and when
        self._phases: dict[str, Phase] = {name: Phase.STOPPED for name in self.instances}  # as last published
        self._ollama_poll: asyncio.Task | None = None
        self._estimated_in: str | None = None  # the Ollama server whose /api/show estimates were taken

    @property
    def learned_sizes(self) -> LearnedSizes | None:
        """What was learned of each kind of model (GPU hosts only): a config change sizes its models with it."""
        return self.meter.learned if self.meter is not None else None

    def _slot_for(self, entry: ModelEntry, sizing: Sizing) -> ModelSlot:
        devices = (ollama.device_id(self.config.ollama, self.profile),) if entry.backend == "ollama" else ()
        return ModelSlot(entry.name, sizing.need, entry.pinned, self._ttl(entry), wanted=entry.preload,
                         devices=devices)

    def _ttl(self, entry: ModelEntry) -> float | None:
        ttl = self.settings.default_ttl if entry.ttl is None else entry.ttl
        return ttl or None  # 0 means: never unload when idle

    # -- lookups -------------------------------------------------------------

    @property
    def closing(self) -> bool:
        return self._closing

    def resolve(self, name: str) -> Instance:
        instance = self._by_name.get(name)
        if instance is None:
            raise UnknownModel(name, list(self.instances))
        return instance

    def phase(self, instance: Instance) -> Phase:
        return self.scheduler.slots[instance.name].phase

    def status_line(self) -> str:
        """One line for systemd's STATUS=: how many models are in each state, and who waits."""
        counts = Counter(str(slot.phase) for slot in self.scheduler.slots.values())
        parts = [f"{counts[p]} {p}" for p in ("ready", "starting", "stopping", "failed") if counts[p]]
        line = ", ".join(parts) or "no model loaded"
        if self.scheduler.waiting():
            line += f"; {self.scheduler.waiting()} request(s) waiting"
        return line + (f"; DEGRADED: {self.degraded}" if self.degraded else "")

    def snapshot(self) -> list[dict]:
        return [self.describe(i) for i in self.instances.values()]

    def devices(self) -> list[dict]:
        """Each device's budget, what was measured free, and why it cannot be used (if so)."""
        return [{"id": d.id, "uuid": d.uuid, "budget": d.budget, "measured_free": d.measured_free,
                 "problem": d.problem} for d in self.scheduler.devices]

    def describe(self, instance: Instance) -> dict:
        slot = self.scheduler.slots[instance.name]
        sizing = instance.sizing
        return {
            "name": instance.name,
            "aliases": list(instance.entry.aliases),
            "backend": instance.entry.backend,
            "tag": instance.entry.tag,
            "state": str(slot.phase),
            "device": slot.device,
            "container": instance.container_id[:12] if instance.container_id else None,
            "config_hash": instance.spec.config_hash() if instance.spec else None,
            "port": instance.spec.endpoint.port if instance.spec else None,
            "endpoint": instance.spec.endpoint.label() if instance.spec else None,
            "preload": instance.entry.preload,
            "pinned": instance.entry.pinned,
            "ttl": slot.ttl,
            "in_flight": slot.in_flight,
            "waiting": len(self.scheduler.queue.get(instance.name, [])),
            "last_used": instance.last_used,
            "ready_at": instance.ready_at,
            "load_seconds": instance.load_seconds,
            "memory": {
                "need": slot.need,
                "declared": sizing.declared,
                "ollama_estimate": instance.show_estimate,
                "estimate": sizing.estimate.as_dict() if sizing.estimate else None,
                "estimate_problem": sizing.problem,
                "learned": sizing.learned,
                "measured": instance.measured,
                "peak": instance.peak,
                "partial_offload": ({"size_vram": instance.offload[0], "size": instance.offload[1]}
                                    if instance.offload else None),
            },
            "error": instance.error,
            "failures": slot.failures,
            "gave_up": slot.gave_up,
        }

    # -- requests --------------------------------------------------------------

    def reserve(self, name: str) -> Reservation:
        """Claim ``name`` for one request; await ``granted``, then always ``release``."""
        instance = self.resolve(name)
        if self._closing:
            raise ShuttingDown("localllmd is shutting down")
        ticket, actions = self.scheduler.submit(instance.name, time.monotonic())
        granted = asyncio.get_running_loop().create_future()
        self._waiters[ticket] = granted
        self._apply(actions)
        return Reservation(instance, ticket, granted)

    def release(self, reservation: Reservation, served: bool = True) -> None:
        if reservation.released:
            return
        reservation.released = True
        granted = reservation.granted
        if granted.done() and not granted.cancelled() and granted.exception() is None:
            reservation.instance.last_used = time.time()
            reservation.instance.served += served  # a load or preload serves nobody: it teaches no lower size
            self._apply(self.scheduler.finished(reservation.instance.name, time.monotonic()))
            return
        self._waiters.pop(reservation.ticket, None)
        if not granted.done():
            granted.cancel()
        # Still queued if it was neither granted nor rejected (a cancelled wait cancels the future too).
        self._apply(self.scheduler.withdraw(reservation.ticket, time.monotonic()))

    @contextlib.contextmanager
    def upstream(self, instance: Instance):
        """The base URL to send one request to, counted against the container it reaches."""
        container_id, base_url = instance.container_id or "", instance.base_url
        self._users[container_id] += 1
        try:
            yield base_url
        finally:
            self._users[container_id] -= 1

    @contextlib.asynccontextmanager
    async def use(self, name: str, served: bool = True):
        """The model's instance, ready and counted in flight for the duration of the block."""
        reservation = self.reserve(name)
        try:
            await reservation.granted
            yield reservation.instance
        finally:
            self.release(reservation, served)

    # -- operator actions ------------------------------------------------------------

    async def load(self, name: str) -> Instance:
        """Start ``name`` now (as a request would: queued, evicting idle models if needed) and wait until ready.

        It then stays like any used model: until its TTL, an eviction or an unload. A model that gave up
        after repeated failures gets a fresh count.
        """
        instance = self.resolve(name)
        async with self._operation(instance.name, "load"):
            if self.scheduler.slots[instance.name].gave_up:
                self.scheduler.reset(instance.name)
            async with self.use(instance.name, served=False):
                return instance

    async def unload(self, name: str) -> Instance:
        """Stop ``name`` now and wait until its container is gone; refused while it serves requests."""
        instance = self.resolve(name)
        slot = self.scheduler.slots[instance.name]
        async with self._operation(instance.name, "unload"):
            if slot.phase is Phase.STARTING:
                raise Conflict(f"'{instance.name}' is starting; unload it once it is ready")
            busy = slot.in_flight + len(self.scheduler.queue.get(instance.name, []))
            if slot.phase is Phase.READY and busy:
                raise ModelBusy(f"'{instance.name}' has {busy} request(s) in flight or waiting; unload it when "
                                "they are done")
            self._apply(self.scheduler.unload(instance.name, time.monotonic(), "unloaded by an operator"))
            while slot.phase is Phase.STOPPING:
                await asyncio.sleep(0.05)
            return instance

    @contextlib.asynccontextmanager
    async def _operation(self, name: str, what: str):
        """One operator action per model at a time: a second one gets a 409, not a silent queue."""
        if self._closing:
            raise ShuttingDown("localllmd is shutting down")
        if name in self._operations:
            raise Conflict(f"'{name}' is already being {self._operations[name]}ed; try again when that is done")
        self._operations[name] = what
        try:
            yield
        finally:
            del self._operations[name]

    async def memory_estimate(self, name: str) -> dict:
        """What the model needs and where that number comes from; an Ollama model asks ``/api/show``."""
        instance = self.resolve(name)
        sizing, slot = instance.sizing, self.scheduler.slots[instance.name]
        answer = {"model": instance.name, "backend": instance.entry.backend, "need": slot.need,
                  "declared": sizing.declared, "learned": sizing.learned, "measured": instance.measured,
                  "estimate": sizing.estimate.as_dict() if sizing.estimate else None, "source": None}
        if instance.in_ollama and not sizing.declared and self.ollama.container_id is not None:
            try:
                show = await self.ollama.api(instance.name).show(instance.upstream_model)
                instance.show_estimate = self._estimate_from_show(show, sizing.launch.context) or instance.show_estimate
                answer["show"] = {"details": show.get("details"), "estimate": instance.show_estimate}
            except LocalllmError as exc:
                answer["show"] = {"problem": exc.message}
        answer["source"] = ("declared" if sizing.declared else "measured" if instance.measured
                            else "learned" if sizing.learned else "ollama /api/show" if instance.show_estimate
                            else "gguf header" if sizing.estimate else "placeholder")
        return answer

    def logs(self, name: str, tail: int, follow: bool) -> AsyncIterator[bytes]:
        """The output of the model's container: ``tail`` lines back, then (``follow``) as it comes."""
        instance = self.resolve(name)
        container_id = instance.container_id
        if container_id is None:
            error = f"; its last error: {instance.error}" if instance.error else ""
            raise ModelNotRunning(f"'{instance.name}' has no container ({self.phase(instance)}){error}")
        return self.runtime.logs_stream(container_id, tail, follow)

    def note_upstream_failure(self, instance: Instance) -> None:
        """A request could not reach the model's server: check in the background whether it died.

        A task of the fleet's own, so a client that leaves cannot cut the check short.
        """
        self.spawn(self.watch.check_exited(instance, "server exited while serving"), f"check:{instance.name}")

    def crashed(self, instance: Instance, reason: str) -> None:
        """The one way a crash comes in (liveness, the engine's return, the Ollama server's failure)."""
        instance.failed_probes = 0
        self._apply(self.scheduler.crashed(instance.name, time.monotonic(), reason))

    # -- lifecycle ---------------------------------------------------------------

    async def tick(self) -> None:
        """Periodic: refresh measured GPU memory and each model's peak, expire waits, unload idle models."""
        if self.meter is not None:
            try:
                self.scheduler.set_devices(await self.meter.read_devices())
                await self._record_peaks(self.meter)
            except Exception:
                logger.opt(exception=True).warning("reading GPU memory failed; keeping the last reading")
        self._poll_ollama_soon()
        self._apply(self.scheduler.tick(time.monotonic()))

    async def _record_peaks(self, meter: GpuMeter) -> None:
        """Every tick: what each ready llama.cpp model's processes use on the GPU (Ollama's: ``_poll_ollama``)."""
        ready = [i for i in self.instances.values() if self.phase(i) is Phase.READY and i.container_id
                 and not i.in_ollama and i.sizing.launch.on_gpu]
        if not ready:
            return
        used = await meter.used_by(i.container_id for i in ready if i.container_id)
        for instance in ready:
            if instance.container_id in used:
                self._observe(instance, used[instance.container_id])

    def _observe(self, instance: Instance, used: int) -> None:
        """A reading of what ``instance`` uses on the GPU: its run's peak, and learned at once when higher."""
        instance.measured = used
        if used <= (instance.peak or 0):
            return
        instance.peak = used
        learned = self.meter.learn(instance, used) if self.meter is not None else None
        if learned is not None:
            self._learned(instance, learned)
        elif instance.in_ollama and not instance.entry.memory:  # what Ollama reports beats the placeholder
            self.scheduler.set_need(instance.name, self._within_budget(used))

    def _finish_run(self, instance: Instance) -> None:
        """A model stops: its run's peak counts towards learning (a lower size only after several such runs)."""
        peak, served = instance.peak, instance.served
        instance.peak, instance.served, instance.offload = None, 0, None
        learned = self.meter.finish_run(instance, peak, served) if self.meter is not None else None
        if learned is not None:
            self._learned(instance, learned)

    def _learned(self, instance: Instance, learned: int) -> None:
        if instance.sizing.learned != learned:
            instance.sizing = replace(instance.sizing, learned=learned)
        if instance.entry.memory:
            return  # declared: what was learned is shown, not used
        # An Ollama model's placeholder stands only until Ollama reports its size.
        need = learned if instance.in_ollama else instance.sizing.need
        self.scheduler.set_need(instance.name, self._within_budget(need))

    # -- config changes (carried out by rollout.py) ------------------------------------

    def ready_specs(self) -> dict[str, ContainerSpec]:
        return {i.name: i.spec for i in self.instances.values()
                if self.phase(i) is Phase.READY and i.spec is not None and i.container_id}

    def spec_for(self, entry: ModelEntry, endpoint: Endpoint, device_id: str | None, config: Config | None = None):
        """The spec ``entry`` runs with under ``config`` (default: the live one): a container, or an Ollama model."""
        config = config or self.config
        if entry.backend == "ollama":
            return ollama.model_spec(entry, self.ollama.server_spec(config, endpoint, entry.name), device_id)
        device = next((d for d in self.scheduler.devices if d.id == device_id), None)
        try:
            return backend_for(entry.backend).container_spec(entry, self.profile, self.settings, endpoint, device,
                                                             self._memory_need(entry), server_user())
        except ValueError as exc:  # no such GPU here: say so rather than run it on every GPU
            raise ModelStartFailed(entry.name, str(exc)) from None

    def _memory_need(self, entry: ModelEntry) -> int | None:
        """What a CPU container's memory limit is derived from: the config's own figure (declared or estimated),
        never a measured one, so the spec's hash stays put while the model runs. None on GPU profiles."""
        if self.profile.has_gpus:
            return None
        instance = self.instances.get(entry.name)
        same = instance is not None and instance.entry == entry
        sizing = instance.sizing if same else size_model(entry, self.profile)
        return sizing.declared or (sizing.estimate.total if sizing.estimate else sizing.fallback) or None

    def _ollama_device(self, config: Config, model: str = "ollama") -> Device | None:
        """The device the Ollama server sees (``ollama.device``); None on the CPU."""
        if not self.profile.has_gpus:
            return None
        wanted = ollama.device_id(config.ollama, self.profile)
        device = next((d for d in self.scheduler.devices if d.id == wanted), None)
        if device is None or device.gpu_request is None:
            known = ", ".join(d.id for d in self.scheduler.devices)
            raise ModelStartFailed(model, f"ollama.device {wanted} is not a GPU of this host ({known})")
        return device

    def room_on(self, device_id: str) -> int:
        device = next(d for d in self.scheduler.devices if d.id == device_id)
        return device.budget - sum(r.bytes for r in self.scheduler.residents() if r.device == device_id)

    async def launch(self, entry: ModelEntry, device_id: str | None, need: int,
                     config: Config | None = None) -> tuple[ContainerSpec, str]:
        """Start ``entry`` in a container of its own beside whatever runs, and gate it.

        Its room stays reserved and the container protected from sweeps until ``commit`` or ``attach``
        takes it, or ``abandon`` removes it.
        """
        if self._closing:
            raise ShuttingDown("localllmd is shutting down")
        if entry.backend == "ollama":
            return await self._launch_in_ollama(entry, device_id, need, config)
        endpoint: Endpoint | None = None
        container_id: str | None = None
        try:
            self.scheduler.reserve_launch(entry.name, device_id or "", need)
            backend = backend_for(entry.backend)
            if not entry.gguf.is_file():
                raise ModelStartFailed(entry.name, f"model file {entry.gguf} does not exist")
            endpoint = self._new_socket(entry.name)
            self._launching[endpoint] = entry.name
            spec = self.spec_for(entry, endpoint, device_id)
            container_id = (await self.runtime.run(spec)).id
            self._protected.add(container_id)
            await wait_until_ready(self.runtime, self.session, model=entry.name, container_id=container_id,
                                   url=endpoint.url + backend.readiness_path,
                                   deadline=entry.startup_timeout or self.settings.startup_timeout)
            return spec, container_id
        except BaseException:
            self.scheduler.release_launch(entry.name)
            if container_id is not None:
                self._protected.discard(container_id)
                with contextlib.suppress(LocalllmError):
                    await self.runtime.stop_and_remove(container_id, 0)
            raise
        finally:
            if endpoint is not None:
                self._launching.pop(endpoint, None)

    async def _launch_in_ollama(self, entry: ModelEntry, device_id: str | None, need: int,
                                config: Config | None) -> tuple[ollama.ModelSpec, str]:
        """A config change's Ollama model: loaded into the server for ``config`` (replaced if that changed).

        Its old self was taken offline first: Ollama holds one instance of a tag.
        """
        self.scheduler.reserve_launch(entry.name, device_id or "", need)
        spec: ollama.ModelSpec | None = None
        try:
            server, container_id = await self.ollama.ensure(config or self.config, entry.name)
            spec = ollama.model_spec(entry, server, device_id)
            await self._load_into_ollama(entry, spec, container_id)
            return spec, container_id
        except BaseException:
            self.scheduler.release_launch(entry.name)
            if spec is not None:  # a load that failed or timed out may still finish: never leave it loaded
                with contextlib.suppress(LocalllmError):
                    await self._unload_tag(entry.name, spec.tag)
            raise

    async def abandon(self, name: str, spec, container_id: str) -> None:
        """Remove what a config change launched but will not use: a container, or a model loaded into Ollama."""
        self.scheduler.release_launch(name)
        if isinstance(spec, ollama.ModelSpec):
            await self._unload_tag(name, spec.tag)
            return
        try:
            await self.runtime.stop_and_remove(container_id, 0)
        except LocalllmError as exc:
            logger.bind(model=name).error("could not remove {}: {}", container_id[:12], exc.message)
        self._protected.discard(container_id)

    async def take_offline(self, name: str, patience: float) -> None:
        """Hold ``name`` (no starts), wait until it is idle, stop it and wait until it is gone."""
        slot = self.scheduler.slots[name]
        self.scheduler.hold(name)
        deadline = time.monotonic() + patience
        while slot.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._apply(self.scheduler.unload(name, time.monotonic(), "replaced by a new config"))
        while slot.phase is not Phase.STOPPED and slot.phase is not Phase.FAILED:
            if time.monotonic() > deadline:
                raise ModelStayedBusy(f"'{name}' stayed busy for {patience:g}s; try the change again later")
            await asyncio.sleep(0.05)

    def attach(self, name: str, spec: ContainerSpec, container_id: str) -> bool:
        """Give a stopped, held model the container a config change started for it, and let it serve."""
        instance = self.instances[name]
        self.scheduler.release(name)
        self.scheduler.release_launch(name)
        attached = self.scheduler.adopt(name, spec.device, time.monotonic())
        if attached:
            instance.spec, instance.container_id = spec, container_id
            instance.ready_at, instance.error = time.time(), None
            self._protected.discard(container_id)
        else:
            logger.bind(model=name).error("could not take its new container (it changed meanwhile); removing it")
            self.retire(name, container_id, 0, instance.entry)
        self._apply(self.scheduler.tick(time.monotonic()))
        return attached

    def release_hold(self, name: str) -> None:
        if name in self.scheduler.slots:
            self.scheduler.release(name)
            self._apply(self.scheduler.tick(time.monotonic()))

    def commit(self, config: Config, sizings: dict[str, Sizing],
               switched: dict[str, tuple[ContainerSpec, str]]) -> list[tuple[str, str, ModelEntry]]:
        """Make ``config`` the live catalog; running models in ``switched`` move to their new containers.

        Returns the (model, container id, its old entry) to retire: replaced containers and removed models'.
        """
        retire: list[tuple[str, str, ModelEntry]] = []
        instances: dict[str, Instance] = {}
        for entry in config.models:
            instance = self.instances.get(entry.name) or Instance(entry, sizings[entry.name])
            old_entry, instance.entry, instance.sizing = instance.entry, entry, sizings[entry.name]
            if entry.name in switched:
                spec, container_id = switched[entry.name]
                self.scheduler.release_launch(entry.name)
                slot = self.scheduler.slots.get(entry.name)
                if slot is not None and slot.phase is Phase.READY and instance.container_id:
                    retire.append((entry.name, instance.container_id, old_entry))
                    instance.spec, instance.container_id = spec, container_id
                    instance.ready_at, instance.error = time.time(), None
                    self._protected.discard(container_id)
                else:  # it stopped or crashed while the new one started: the new one is not needed
                    retire.append((entry.name, container_id, entry))
            instances[entry.name] = instance
        for name, instance in self.instances.items():
            if name not in instances and instance.container_id:
                retire.append((name, instance.container_id, instance.entry))
        for name in set(self.instances) - set(instances):
            before = self._phases.pop(name, Phase.STOPPED)
            self.events.publish(EventKind.STATE, f"{before} -> removed (no longer in the catalog)", name,
                                **{"from": str(before), "to": "removed"})
        self.config, self.instances = config, instances
        self._by_name = {name: instances[e.name] for e in config.models for name in e.names}
        self._apply(self.scheduler.replace_slots([self._slot_for(e, sizings[e.name]) for e in config.models],
                                                 time.monotonic()))
        for instance in instances.values():  # what Ollama reported beats the placeholder of a new sizing
            if instance.in_ollama and instance.measured and not instance.entry.memory:
                self.scheduler.set_need(instance.name, self._within_budget(instance.measured))
        return retire

    def retire(self, name: str, container_id: str, patience: float, entry: ModelEntry) -> None:
        """Stop a container no model uses any more, once the requests it still serves are done.

        An Ollama model (``entry``) is unloaded from the server instead; the server stays.
        """
        if entry.backend == "ollama":
            self.spawn(self._unload_tag(name, entry.tag or name), f"retire:{name}")
            return

        async def drain_then_stop() -> None:
            try:
                deadline = time.monotonic() + patience
                while self._users[container_id] > 0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                await self.runtime.stop_and_remove(container_id, self.settings.stop_grace)
                logger.bind(model=name).info("retired container {}", container_id[:12])
            finally:
                self._users.pop(container_id, None)
                self._protected.discard(container_id)

        self._protected.add(container_id)  # sweeps leave it alone while it drains
        self.spawn(drain_then_stop(), f"retire:{name}")

    async def adopt_existing(self) -> list[str]:
        """Reconcile our containers found at start-up (``adoption.plan``); returns the models to start again.

        Adopted: running, same config hash, healthy, and fitting the budget (same container, not restarted).
        Removed: not in the catalog, not running, a duplicate, unhealthy, or over budget.
        Recreated: those whose config changed (the caller starts them again).
        Containers without our owner label are never looked at.
        """
        found = await self.runtime.list_labelled({LABEL_OWNER: self.settings.instance})
        recreate: list[str] = []
        for step in adoption.plan(found, {info.id: self._wanted(info) for info in found}):
            reason: str | None = step.reason
            if step.action is adoption.Action.ADOPT:
                adopt = self._adopt_ollama_server if step.model == ollama.SERVER_LABEL else self._adopt
                reason = await adopt(step.container, step.spec)
                if reason is None:
                    continue
            elif step.action is adoption.Action.RECREATE and step.model in self.instances:
                recreate.append(step.model)
            logger.bind(model=step.model or "?").warning("removing container {}: {}", step.container.name, reason)
            await self.runtime.stop_and_remove(step.container.id, self.settings.stop_grace)
        return recreate

    def _wanted(self, info: ContainerInfo) -> adoption.Wanted:
        """The spec a found container should have, from its labels (endpoint, device) and today's config."""
        model = info.labels.get(LABEL_MODEL, "")
        instance = self.instances.get(model)
        if instance is None and model != ollama.SERVER_LABEL:
            return adoption.Wanted()
        try:
            endpoint = Endpoint.from_label(info.labels.get(LABEL_ENDPOINT, ""))
        except ValueError:
            return adoption.Wanted(problem="its endpoint label is unreadable (made by an older localllm)")
        if endpoint.socket is None:
            return adoption.Wanted(problem="its config changed (it listens on a port, not a socket)")
        if instance is None:  # the Ollama server
            try:
                return adoption.Wanted(spec=self.ollama.server_spec(self.config, endpoint))
            except LocalllmError as exc:
                return adoption.Wanted(problem=exc.message)
        device = next((d for d in self.scheduler.devices if d.id == info.labels.get(LABEL_DEVICE)), None)
        if device is None:
            return adoption.Wanted(problem="its config changed (its device is not one of this host's now)")
        try:
            return adoption.Wanted(spec=self.spec_for(instance.entry, endpoint, device.id))
        except LocalllmError as exc:
            return adoption.Wanted(problem=exc.message)

    async def _adopt(self, info: ContainerInfo, spec: ContainerSpec) -> str | None:
        """Take a model's container as its own once it answers and fits; or say why not."""
        instance = self.instances[info.labels[LABEL_MODEL]]
        backend = backend_for(instance.entry.backend)
        if await probe(self.session, spec.endpoint.url + backend.readiness_path, timeout=2.0) != 200:
            return "its server is not healthy"
        if not self.scheduler.adopt(instance.name, spec.device, time.monotonic()):
            return "it does not fit the memory budget"
        instance.spec, instance.container_id, instance.ready_at = spec, info.id, time.time()
        logger.bind(model=instance.name).info("adopted running container {} ({})", info.name, spec.endpoint)
        self.events.publish(EventKind.ADOPT, f"adopted running container {info.name}", instance.name,
                            container=info.id[:12])
        self._publish_phases()
        return None

    async def _adopt_ollama_server(self, info: ContainerInfo, spec: ContainerSpec) -> str | None:
        """Take the Ollama server once it answers, then the catalog's models it has loaded; or say why not."""
        if await probe(self.session, spec.endpoint.url + ollama.readiness_path, timeout=2.0) != 200:
            return "its server is not healthy"
        self.ollama.adopt(spec, info.id)
        logger.info("adopted the running Ollama server {} ({})", info.name, spec.endpoint)
        self.events.publish(EventKind.ADOPT, f"adopted the running Ollama server {info.name}", None,
                            container=info.id[:12])
        try:
            loaded = await self.ollama.api("ollama").loaded(self._ollama_patience())
        except LocalllmError as exc:
            logger.warning("cannot list the Ollama server's loaded models: {}", exc.message)
            return None
        adopted = set()
        for instance in [i for i in self.instances.values() if i.in_ollama]:
            entry = find_loaded(loaded, instance.upstream_model)
            if entry is None:
                continue
            measured = memory_in_use(entry, self.profile.has_gpus)
            if measured and not instance.entry.memory:
                self.scheduler.set_need(instance.name, self._within_budget(measured))  # admitted with what it uses
            if self.scheduler.adopt(instance.name, spec.device, time.monotonic()):
                instance.spec = ollama.model_spec(instance.entry, spec, spec.device)
                instance.container_id, instance.ready_at, instance.measured = info.id, time.time(), measured
                adopted.add(entry["name"])
                logger.bind(model=instance.name).info("adopted: loaded in the Ollama server")
                self.events.publish(EventKind.ADOPT, "adopted: loaded in the Ollama server", instance.name,
                                    container=info.id[:12])
        for tag in set(loaded) - adopted:  # not in the catalog, or over budget: nobody would account for it
            logger.warning("unloading '{}' from the adopted Ollama server: no catalog model holds it", tag)
            with contextlib.suppress(LocalllmError):
                await self._unload_tag("ollama", tag)
        self._publish_phases()
        return None

    async def start_models(self, names: list[str]) -> None:
        """Start these models as if each had a request; each lets go as soon as it is ready."""

        async def start(name: str) -> None:
            try:
                async with self.use(name, served=False):
                    pass
            except LocalllmError as exc:
                logger.bind(model=name).error("start failed: {}", exc.message)

        await asyncio.gather(*(start(name) for name in names))

    async def reconcile(self) -> None:
        """Compare our containers with what we believe runs: lost ones are crashes, unowned ones go."""
        found = {c.id: c for c in await self.runtime.list_labelled({LABEL_OWNER: self.settings.instance})}
        for instance in self.instances.values():
            info = found.get(instance.container_id or "")
            if self.phase(instance) is Phase.READY and (info is None or info.exited):
                self.crashed(instance, "container lost while the Docker engine was away")
        if self._launching or any(self.phase(i) is Phase.STARTING for i in self.instances.values()):
            return  # a container being created may not be owned yet: leave the sweep for later
        await self._sweep(list(found.values()), grace=0)

    async def remove_leftovers(self) -> int:
        """The shutdown sweep: remove every container of ours that no model owns (e.g. a cancelled start's)."""
        found = await self.runtime.list_labelled({LABEL_OWNER: self.settings.instance})
        return await self._sweep(found, grace=self.settings.stop_grace)

    async def _sweep(self, found: list[ContainerInfo], grace: float) -> int:
        """Remove the found containers no model owns (``adoption.plan``, sweeping); return how many."""
        owned = {i.container_id for i in self.instances.values()} | self._protected | {self.ollama.container_id}
        removals = [step for step in adoption.plan(found, {}, frozenset(c for c in owned if c), sweep_only=True)
                    if step.action is adoption.Action.REMOVE]
        for step in removals:
            logger.warning("removing container {}: {}", step.container.name, step.reason)
            await self.runtime.stop_and_remove(step.container.id, grace)
        return len(removals)

    def refuse_new_work(self) -> None:
        """The first step of shutdown: no request, start or config change is taken from now on."""
        self._closing = True

    async def shutdown(self) -> None:
        """Refuse new work, fail the waiting, cancel starts and stops, remove every container we run."""
        self.refuse_new_work()
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(ShuttingDown("localllmd is shutting down"))
                future.exception()  # retrieved: nobody may be waiting any more
        self._waiters.clear()
        while self._tasks:  # a cancelled task may have spawned another: until none is left
            pending = list(self._tasks)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for instance in self.instances.values():
            if instance.in_ollama:  # the server goes as a whole: no need to unload one by one
                instance.container_id, instance.spec = None, None
        await asyncio.gather(*(self._discard_container(i) for i in self.instances.values()), return_exceptions=True)
        with contextlib.suppress(LocalllmError):
            await self.ollama.discard()
        self._protected.clear()  # at shutdown everything of ours goes
        try:
            await self.remove_leftovers()
            await self.runtime.remove_networks(self.settings.instance)
        except LocalllmError as exc:
            logger.error("final sweep for leftover containers failed: {}", exc.message)
        if self._wakeup is not None:
            self._wakeup.cancel()

    # -- carrying out the scheduler's actions --------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Grant):
                future = self._waiters.pop(action.ticket, None)
                if future is not None and not future.done():
                    future.set_result(None)
            elif isinstance(action, Reject):
                future = self._waiters.pop(action.ticket, None)
                if future is not None and not future.done():
                    future.set_exception(action.error)
            elif isinstance(action, Start):
                if self._closing:
                    continue  # nothing new starts during shutdown
                logger.bind(model=action.model, device=action.device).info("start: {}", action.reason)
                failures = self.scheduler.slots[action.model].failures
                if failures:
                    self.events.publish(EventKind.RESTART, f"starting again after {failures} failure(s)", action.model,
                                        failures=failures)
                self.spawn(self._start(action.model), f"start:{action.model}")
            elif isinstance(action, Stop):
                log = logger.bind(model=action.model)
                (log.error if action.crashed else log.info)("stop: {}", action.reason)
                kind = stop_event_kind(action.cause)
                self.events.publish(kind, action.reason, action.model, reason=action.reason, cause=action.cause)
                self.spawn(self._stop(action.model, action.reason if action.crashed else None),
                            f"stop:{action.model}")
            elif isinstance(action, Note):
                logger.bind(model=action.model).info("{}", action.message)
        self._publish_phases()
        self._arm_wakeup()

    def _publish_phases(self) -> None:
        """One ``state`` event per model whose phase changed since the last look."""
        for name, slot in self.scheduler.slots.items():
            before = self._phases.get(name, Phase.STOPPED)
            if slot.phase is not before:
                self._phases[name] = slot.phase
                self.events.publish(EventKind.STATE, f"{before} -> {slot.phase}", name, **{"from": str(before),
                                                                                   "to": str(slot.phase)})

    def _arm_wakeup(self) -> None:
        """Wake the scheduler exactly when the earliest backoff ends, not at the next tick."""
        due = self.scheduler.next_wakeup(time.monotonic())
        if due is None or (self._wakeup is not None and self._wakeup_at <= due):
            return
        if self._wakeup is not None:
            self._wakeup.cancel()
        self._wakeup_at = due
        self._wakeup = asyncio.get_running_loop().call_later(max(0.0, due - time.monotonic()), self._on_wakeup)

    def _on_wakeup(self) -> None:
        self._wakeup = None
        if not self._closing:
            self._apply(self.scheduler.tick(time.monotonic()))

    def spawn(self, coroutine, name: str) -> None:
        """Run ``coroutine`` as one of the fleet's tasks: cancelled at shutdown, its failure logged."""
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.opt(exception=task.exception()).error("background task {} failed", task.get_name())

    async def _start(self, name: str) -> None:
        instance = self.instances[name]
        log = logger.bind(model=name)
        started = time.monotonic()
        instance.error = None
        try:
            await (self._start_in_ollama(instance) if instance.in_ollama else self._start_container(instance))
        except asyncio.CancelledError:
            await self._discard_quietly(instance)
            raise
        except Exception as exc:  # whatever went wrong, the scheduler hears about it
            error = exc if isinstance(exc, LocalllmError) else ModelStartFailed(name, f"unexpected error: {exc!r}")
            if not isinstance(exc, LocalllmError):
                log.opt(exception=exc).error("unexpected error while starting")
            await self._discard_quietly(instance)
            instance.error = error.message
            log.error("start failed: {}", error.message)
            self.events.publish(EventKind.LOAD_FAILED, error.message, name, error=error.message)
            self._apply(self.scheduler.started(name, time.monotonic(), error))
            return
        instance.load_seconds = time.monotonic() - started
        instance.ready_at = time.time()
        log.info("ready in {:.2f}s", instance.load_seconds)
        self._apply(self.scheduler.started(name, time.monotonic()))
        self.events.publish(EventKind.LOAD, f"ready in {instance.load_seconds:.2f}s", name,
                            seconds=round(instance.load_seconds, 4), container=(instance.container_id or "")[:12])

    async def _start_container(self, instance: Instance) -> None:
        """Create the model's own container and wait for its readiness gate."""
        name, entry = instance.name, instance.entry
        if not entry.gguf.is_file():
            raise ModelStartFailed(name, f"model file {entry.gguf} does not exist")
        self._check_models_root(entry)
        backend = backend_for(entry.backend)
        endpoint = self._new_socket(name)
        instance.spec = self.spec_for(entry, endpoint, self.scheduler.slots[name].device)
        info = await self._create_container(instance, instance.spec)
        logger.bind(model=name).info("container {} started ({})", info.name, endpoint)
        await wait_until_ready(self.runtime, self.session, model=name, container_id=info.id,
                               url=endpoint.url + backend.readiness_path,
                               deadline=entry.startup_timeout or self.settings.startup_timeout)
        await self._check_on_gpu(instance)

    def _check_models_root(self, entry: ModelEntry) -> None:
        """The policy's models_root, again at the start: the file checked at apply may be a symlink now."""
        policy = self.settings.policy
        if policy is not None and policy.models_root is not None and entry.gguf is not None:
            problem = escapes(entry.gguf, Path(os.path.realpath(policy.models_root)))
            if problem:
                raise ModelStartFailed(entry.name, f"refused by the policy: {problem}")

    async def _check_on_gpu(self, instance: Instance) -> None:
        """A ready GPU model must show up in NVML on its GPU (``GpuMeter.on_its_gpu``); what it uses is observed."""
        if self.meter is not None:
            used = await self.meter.on_its_gpu(instance, self._device_of(instance.name))
            if used:
                self._observe(instance, used)

    async def _start_in_ollama(self, instance: Instance) -> None:
        """Make sure the server runs, has the model (pulling it if allowed) and has it loaded."""
        server, container_id = await self.ollama.ensure(self.config, instance.name)
        await self._estimate_for_admission(container_id)
        spec = ollama.model_spec(instance.entry, server, self.scheduler.slots[instance.name].device)
        # Counted as in the server before the load is asked for: a load that fails, times out or is cancelled
        # may still complete inside Ollama, and the discard that follows must unload it (keep_alive 0).
        instance.spec, instance.container_id = spec, container_id
        await self._load_into_ollama(instance.entry, spec, container_id)
        try:  # /api/ps waits while Ollama loads another model: as long as a load may take
            loaded = await self.ollama.api(instance.name).loaded(self._ollama_patience(instance.entry))
        except LocalllmError:
            return  # measured at the next poll
        entry = find_loaded(loaded, instance.upstream_model)
        if entry is not None and self.profile.has_gpus and offload_of(entry)[0] == 0:
            raise ModelStartFailed(instance.name, (
                f"Ollama loaded '{spec.tag}' entirely on the CPU (size_vram 0 of {offload_of(entry)[1]} bytes): its "
                f"server does not see {spec.device}. Likely causes: the NVIDIA Container Toolkit is not set up as a "
                "Docker runtime, or the driver is older than the Ollama image needs (the server's log says)"))
        if entry is not None:
            self._observe_ollama(instance, entry)

    async def _load_into_ollama(self, entry: ModelEntry, spec: ollama.ModelSpec, container_id: str) -> None:
        """Pull if allowed, then load the tag as Ollama will serve it: with the Modelfile's own ``num_ctx`` when it
        sets one (a ``/v1`` request would otherwise reload it), and through ``/api/embed`` for an embedding model."""
        api, name = self.ollama.api(entry.name), entry.name
        if not await api.has(spec.tag):
            if not entry.pull:
                raise ModelStartFailed(name, f"the Ollama server has no '{spec.tag}', and pull is off for it "
                                             "(set pull: true, or pull it into the server yourself)")
            await api.pull(spec.tag, lambda line: self._pull_progress(name, spec.tag, line))
        show: dict = {}
        with contextlib.suppress(LocalllmError):
            show = await api.show(spec.tag)
        modelfile_context = context_from_show(show)
        instance = self.instances.get(name)
        guess = self._estimate_from_show(show, modelfile_context or spec.context) if show else None
        if guess and instance is not None and not entry.memory and instance.sizing.learned is None:
            instance.show_estimate = guess
        embedding = embedding_only(show)
        logger.bind(model=name).info("loading '{}' into the Ollama server ({}{})", spec.tag,
                                     f"the Modelfile's context {modelfile_context}" if modelfile_context
                                     else f"context {spec.context}", ", an embedding model" if embedding else "")
        deadline = self._ollama_patience(entry)
        try:
            async with asyncio.timeout(deadline):
                await api.load(spec.tag, None if modelfile_context else spec.context, embedding)
        except TimeoutError:
            raise ModelStartFailed(name, f"Ollama did not load '{spec.tag}' within {deadline:g}s") from None

    async def _estimate_for_admission(self, container_id: str) -> None:
        """Once per server: ``/api/show``'s estimate replaces the placeholder need of every Ollama model that
        nothing was measured, learned or declared for, so the next admissions of them use it."""
        if self._estimated_in == container_id:
            return
        self._estimated_in = container_id
        for instance in [i for i in self.instances.values() if i.in_ollama]:
            if instance.entry.memory or instance.sizing.learned or instance.peak:
                continue
            try:
                show = await self.ollama.api(instance.name).show(instance.upstream_model)
            except LocalllmError:
                continue  # not in the server yet (a pull comes with its start)
            guess = self._estimate_from_show(show, context_from_show(show) or instance.sizing.launch.context)
            if guess:
                instance.show_estimate = guess
                if not self.scheduler.slots[instance.name].holds_memory:
                    self.scheduler.set_need(instance.name, self._within_budget(guess))

    def _estimate_from_show(self, show: dict, context: int) -> int | None:
        """Ollama's own sizing, from ``/api/show``: every slot's KV cache, in the server's cache type."""
        settings = self.config.ollama
        return estimate_from_show(show, context, settings.num_parallel,
                                  settings.env.get("OLLAMA_KV_CACHE_TYPE", "f16"))

    def _ollama_patience(self, entry: ModelEntry | None = None) -> float:
        """How long an Ollama call may take that waits on a load (Ollama loads one model at a time)."""
        return (entry.startup_timeout if entry and entry.startup_timeout else None) or self.settings.startup_timeout

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
        self.events.publish(EventKind.PULL, f"pulling {tag}: {status}{share}", name, status=status, total=total,
                            completed=completed)

    def _observe_ollama(self, instance: Instance, entry: dict) -> None:
        """What ``/api/ps`` says the loaded model uses: its size where it is budgeted, and a partial offload."""
        size_vram, size = offload_of(entry)
        partial = (size_vram, size) if self.profile.has_gpus and 0 < size_vram < size else None
        reported, instance.offload = instance.offload, partial
        if partial and not reported:
            message = (f"Ollama put part of '{instance.upstream_model}' on the CPU: {size_vram // 2**20} MiB of "
                       f"{size // 2**20} MiB on the GPU (it thought too little was free); it runs slower")
            logger.bind(model=instance.name).warning("{}", message)
            self.events.publish(EventKind.PARTIAL_OFFLOAD, message, instance.name, size_vram=size_vram, size=size)
        measured = memory_in_use(entry, self.profile.has_gpus)
        if measured:
            self._observe(instance, measured)

    def _poll_ollama_soon(self) -> None:
        """Each tick, unless the last poll still runs (Ollama's /api/ps waits while a model loads)."""
        if self._ollama_poll is not None and not self._ollama_poll.done():
            return
        if self.ollama.container_id is None or not any(
                i.in_ollama and self.phase(i) is Phase.READY for i in self.instances.values()):
            return
        self._ollama_poll = asyncio.ensure_future(self._poll_ollama())
        self._tasks.add(self._ollama_poll)
        self._ollama_poll.add_done_callback(self._task_done)

    async def _poll_ollama(self) -> None:
        """What Ollama has loaded now: a model it unloaded on its own (evicted, or its runner exited) is
        shown as stopped, and each loaded one's size is measured for its peak."""
        asked_at = time.time()
        try:
            loaded = await self.ollama.api("ollama").loaded()
        except LocalllmError:
            return  # a dead or hung server is the liveness probe's to find
        for instance in [i for i in self.instances.values() if i.in_ollama and self.phase(i) is Phase.READY]:
            if instance.container_id != self.ollama.container_id or (instance.ready_at or 0) > asked_at:
                continue  # not in this server, or loaded after we asked
            entry = find_loaded(loaded, instance.upstream_model)
            if entry is not None:
                self._observe_ollama(instance, entry)
                continue
            reason = "evicted by Ollama: it unloaded the model on its own (for room, or its runner exited)"
            actions = self.scheduler.unload(instance.name, time.monotonic(), reason, StopCause.SERVER)  # only when idle
            if actions:
                logger.bind(model=instance.name).warning("{}", reason)
            self._apply(actions)

    def _within_budget(self, measured: int) -> int:
        """It did run: never let a measurement put a model out of every budget."""
        return min(measured, max(d.budget for d in self.scheduler.devices))

    async def _unload_from_ollama(self, instance: Instance, crashed: bool = False) -> None:
        """Unload the model from the server. After a crash (dead or hung server) the server itself goes."""
        container_id = instance.container_id
        if container_id is None:
            return
        try:
            if crashed:
                await self._server_failed(container_id)
            else:
                await self._unload_tag(instance.name, instance.upstream_model)
        finally:
            if instance.container_id == container_id:
                instance.container_id, instance.spec, instance.measured = None, None, None

    async def _unload_tag(self, name: str, tag: str) -> None:
        container_id = self.ollama.container_id
        if container_id is None:
            return
        entry = self.config.model_named(name)
        patience = self._ollama_patience(entry)
        try:
            api = self.ollama.api(name)
            await api.unload(tag, timeout=patience)  # waits while Ollama finishes a load it is doing
            # keep_alive 0 only queues the unload: the runner goes after its requests, then Ollama waits for
            # the VRAM. Only then is the memory free for the next model.
            if not await api.wait_gone(tag, patience):
                logger.bind(model=name).warning("'{}' is still listed by Ollama {:g}s after its unload", tag, patience)
            logger.bind(model=name).info("unloaded '{}' from the Ollama server", tag)
        except LocalllmError as exc:
            if await self.ollama.running():
                raise LocalllmError(f"Ollama did not unload '{tag}': {exc.message}") from None
            await self._server_failed(container_id)

    async def _server_failed(self, container_id: str) -> None:
        """The Ollama server died or hangs: remove it, and every model still counted as ready in it crashed."""
        for other in self.instances.values():
            if other.in_ollama and other.container_id == container_id and self.phase(other) is Phase.READY:
                self.crashed(other, "the Ollama server died or stopped answering")
        if self.ollama.container_id == container_id:
            logger.warning("removing the failed Ollama server {}", container_id[:12])
            await self.ollama.discard(0)

    async def _stop(self, name: str, crash_reason: str | None = None) -> None:
        """Remove the model's container (keeping a crashed one's last words); always report ``stopped``."""
        instance = self.instances[name]
        device = self._device_of(name)
        error: LocalllmError | None = None
        try:
            held, figure = await self.meter.held(instance, device) if self.meter else ({}, 0)  # before the discard
            self._finish_run(instance)
            if crash_reason is not None:
                error = await self._crash_error(instance, crash_reason)
            await self._discard_container(instance, grace=0 if crash_reason else None, crashed=bool(crash_reason))
            if held and device is not None and self.meter is not None:
                await self.meter.wait_memory_back(name, device, held, figure)
        except Exception as exc:  # never leave the scheduler waiting for this stop
            failure = exc if isinstance(exc, LocalllmError) else LocalllmError(repr(exc))
            instance.error = f"stop failed: {failure.message}"
            logger.bind(model=name).opt(exception=exc).error("{}", instance.error)
            error = error or failure
        finally:
            self._apply(self.scheduler.stopped(name, time.monotonic(), error))

    async def _crash_error(self, instance: Instance, reason: str) -> LocalllmError:
        """What a crashed model's failure says: the reason, the exit code and the container's last lines."""
        container_id = instance.container_id
        info = await self.runtime.inspect(container_id) if container_id else None
        logs = await self.runtime.logs_tail(container_id) if container_id else ""
        error = UpstreamFailed(describe_exit(reason, info.exit_code if info else None, logs))
        instance.error = error.message
        logger.bind(model=instance.name).error("{}", error.message)
        return error

    def _device_of(self, name: str) -> Device | None:
        device_id = self.scheduler.slots[name].device
        return next((d for d in self.scheduler.devices if d.id == device_id), None)

    async def _create_container(self, instance: Instance, spec: ContainerSpec):
        """Create and start (a cancelled start leaves no container: the runtime removes it)."""
        info = await self.runtime.run(spec)
        instance.container_id = info.id
        return info

    async def _discard_container(self, instance: Instance, grace: float | None = None, crashed: bool = False) -> None:
        """Stop and remove the model's container; the id is forgotten only once it is really gone.

        An Ollama model is unloaded from the server instead (the server is removed only when dead).
        """
        if instance.in_ollama:
            await self._unload_from_ollama(instance, crashed)
            return
        container_id = instance.container_id
        if container_id is not None:
            for attempt in range(DISCARD_ATTEMPTS):
                try:
                    await self.runtime.stop_and_remove(container_id,
                                                       self.settings.stop_grace if grace is None else grace)
                    break
                except LocalllmError as exc:
                    if attempt == DISCARD_ATTEMPTS - 1:
                        raise
                    logger.bind(model=instance.name).warning("removing {} failed ({}); retrying",
                                                             container_id[:12], exc.message)
                    await asyncio.sleep(0.5 * 2**attempt)
            logger.bind(model=instance.name).info("container {} stopped and removed", container_id[:12])
        if instance.container_id == container_id:
            instance.container_id, instance.spec, instance.measured = None, None, None

    async def _discard_quietly(self, instance: Instance) -> None:
        try:
            await self._discard_container(instance)
        except LocalllmError as exc:
            logger.bind(model=instance.name).error("could not remove its container ({}); the shutdown sweep "
                                                   "or the next start removes it", exc.message)

    def _new_socket(self, model: str, user: tuple[int, int] | None = None) -> Endpoint:
        """A fresh socket endpoint and its private directory for a server running as ``user`` (default: the
        llama.cpp servers' user); directories no server uses any more are removed."""
        endpoint = Endpoint(socket=secrets.token_hex(8))
        servers = servers_dir(self.settings.state_dir)
        in_use = {e.socket for e in self._launching} | {
            i.spec.endpoint.socket for i in self.instances.values() if i.spec is not None}
        if self.ollama.spec is not None:
            in_use.add(self.ollama.spec.endpoint.socket)
        try:
            sweep_socket_dirs(servers, in_use)
            make_socket_dir(servers, endpoint, user or server_user())
        except OSError as exc:
            raise ModelStartFailed(model, f"cannot make the directory for its socket in {servers}: "
                                          f"{exc.strerror or exc}") from None
        return endpoint
