"""The fleet: the single owner of live model state, and the hands of the scheduler.

``Scheduler`` (pure) decides; ``Fleet`` feeds it events and carries out its
actions: starting and stopping models through their hosting (``hosting.py``),
granting or rejecting waiting requests. Everything runs on the event loop;
every scheduler call and the application of its actions happen with no
``await`` in between, so no lock is needed. Slow work (a start and its
readiness gate, a stop and the wait for memory to come back) runs as a task
whose outcome returns to the scheduler as an event.

The units around it report through its entry points: ``crashed`` (liveness),
``observe``, ``set_measured_need`` and ``server_dropped`` (hostings),
``admit_adopted`` (adoption).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine

import aiohttp
from loguru import logger

from supervisor.config.profiles import Profile
from supervisor.config.settings import Config, ModelEntry
from supervisor.core.errors import (
    Conflict,
    LocalllmError,
    ModelBusy,
    ModelStartFailed,
    ShuttingDown,
    UnknownModel,
)
from supervisor.core.placement import Device, GpuReading, devices_for
from supervisor.core.scheduler import Scheduler
from supervisor.core.slots import Action, Grant, Limits, ModelSlot, Note, Phase, Reject, Start, Stop
from supervisor.core.stop_cause import StopCause
from supervisor.fleet import views
from supervisor.fleet.adopting import Adopter
from supervisor.fleet.container_hosting import ContainerHosting
from supervisor.fleet.events import EventBus, EventKind, stop_event_kind
from supervisor.fleet.gpu_meter import GpuMeter
from supervisor.fleet.hosting import EndpointPool, Hosting
from supervisor.fleet.instance import Instance, Reservation, Spec
from supervisor.fleet.ledger import ContainerLedger
from supervisor.fleet.liveness import Watch
from supervisor.fleet.measuring import Measuring
from supervisor.fleet.ollama_hosting import OllamaHosting
from supervisor.fleet.sizing import Sizing
from supervisor.fleet.switching import Switching
from supervisor.runtime.container_runtime import ContainerRuntime
from supervisor.runtime.gpu_watch import GpuWatch
from supervisor.state.learned import LearnedSizes


class Fleet:
    def __init__(
        self,
        config: Config,
        profile: Profile,
        runtime: ContainerRuntime,
        session: aiohttp.ClientSession,
        sizings: dict[str, Sizing],
        learned: LearnedSizes | None = None,
        gpu_readings: list[GpuReading] | None = None,
        events: EventBus | None = None,
        gpu: GpuWatch | None = None,
    ):
        self.config = config
        self.events = events or EventBus()
        self.profile = profile
        self.runtime = runtime
        self.session = session
        self.settings = config.daemon
        self.endpoints = EndpointPool(self.settings.state_dir, self._sockets_in_use)
        # how each backend's models are hosted: the only place that knows the kinds
        self.hostings: dict[str, Hosting] = {"llamacpp": ContainerHosting(self, "llamacpp")}
        self.hostings["ollama"] = OllamaHosting(self)
        self.instances = {e.name: Instance(e, sizings[e.name]) for e in config.models}
        self._by_name = {name: self.instances[e.name] for e in config.models for name in e.names}
        self.scheduler = Scheduler(
            devices_for(profile, gpu_readings),
            [self._slot_for(e, sizings[e.name]) for e in config.models],
            Limits.from_settings(self.settings),
        )
        # NVML, on a GPU host where it works: readings, peaks, learning, memory waits; absent otherwise
        self.meter = GpuMeter(gpu, learned, self.events, profile, self.scheduler.devices) if gpu else None
        self._waiters: dict[int, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._wakeup: asyncio.TimerHandle | None = None
        self._wakeup_at = 0.0
        self.ledger = ContainerLedger()  # requests per container, launches, containers no sweep may remove
        self.degraded: str | None = None  # why the last config change could not even be reverted
        self.engine_problem: str | None = None  # set while the Docker engine does not answer
        self.watch = Watch(self)  # liveness probes and the engine watch; crashes come back through crashed()
        self.adopter = Adopter(self)  # adoption at start-up, reconcile and sweeps
        self.switching = Switching(self)  # a config change's hands (rollout.py decides)
        self.measuring = Measuring(self)  # what models use: peaks, learning, the need they are admitted with
        self._operations: dict[str, str] = {}  # model -> the operator's load or unload in progress

    @property
    def learned_sizes(self) -> LearnedSizes | None:
        """What was learned of each kind of model (GPU hosts only): a config change sizes its models with it."""
        return self.meter.learned if self.meter is not None else None

    def hosting_of(self, entry: ModelEntry) -> Hosting:
        return self.hostings[entry.backend]

    def instances_of(self, hosting: Hosting) -> list[Instance]:
        return [i for i in self.instances.values() if self.hostings[i.entry.backend] is hosting]

    def server_hosting(self, label: str) -> Hosting | None:
        """The hosting whose own server container carries the model label ``label``, if any."""
        return next((h for h in self.hostings.values() if h.server_label and h.server_label == label), None)

    def _slot_for(self, entry: ModelEntry, sizing: Sizing) -> ModelSlot:
        return ModelSlot(
            entry.name,
            sizing.need,
            entry.pinned,
            self._ttl(entry),
            wanted=entry.preload,
            devices=self.hosting_of(entry).devices(self.config),
        )

    def _ttl(self, entry: ModelEntry) -> float | None:
        ttl = self.settings.default_ttl if entry.ttl is None else entry.ttl
        return ttl or None  # 0 means: never unload when idle

    def device(self, device_id: str | None) -> Device | None:
        return next((d for d in self.scheduler.devices if d.id == device_id), None)

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

    def describe(self, instance: Instance) -> dict:
        return views.describe(self, instance)

    def snapshot(self) -> list[dict]:
        return [views.describe(self, i) for i in self.instances.values()]

    def devices(self) -> list[dict]:
        return views.devices(self)

    def status_line(self) -> str:
        return views.status_line(self)

    # -- requests --------------------------------------------------------------

    def reserve(self, name: str) -> Reservation:
        """Claim ``name`` for one request; await ``granted``, then always ``release``."""
        instance = self.resolve(name)
        if self._closing:
            raise ShuttingDown("localllmd is shutting down")
        ticket, actions = self.scheduler.submit(instance.name, time.monotonic())
        granted = asyncio.get_running_loop().create_future()
        self._waiters[ticket] = granted
        self.carry_out(actions)
        return Reservation(instance, ticket, granted)

    def release(self, reservation: Reservation, served: bool = True) -> None:
        if reservation.released:
            return
        reservation.released = True
        granted = reservation.granted
        if granted.done() and not granted.cancelled() and granted.exception() is None:
            reservation.instance.last_used = time.time()
            reservation.instance.served += served  # a load or preload serves nobody: it teaches no lower size
            self.carry_out(self.scheduler.finished(reservation.instance.name, time.monotonic()))
            return
        self._waiters.pop(reservation.ticket, None)
        if not granted.done():
            granted.cancel()
        # Still queued if it was neither granted nor rejected (a cancelled wait cancels the future too).
        self.carry_out(self.scheduler.withdraw(reservation.ticket, time.monotonic()))

    @contextlib.contextmanager
    def upstream(self, instance: Instance):
        """The base URL to send one request to, counted against the container it reaches."""
        with self.ledger.upstream(instance.container_id or ""):
            yield instance.base_url

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

        It then stays like any used model: until its TTL, an eviction or an unload. A failed model (in its
        restart backoff, or given up) gets a fresh count and starts now: the operator has acted.
        """
        instance = self.resolve(name)
        async with self._operation(instance.name, "load"):
            if self.scheduler.slots[instance.name].phase is Phase.FAILED:
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
            busy = slot.in_flight + self.scheduler.view(instance.name).waiting
            if slot.phase is Phase.READY and busy:
                raise ModelBusy(
                    f"'{instance.name}' has {busy} request(s) in flight or waiting; unload it when they are done"
                )
            self.carry_out(self.scheduler.unload(instance.name, time.monotonic(), "unloaded by an operator"))
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

    # -- entry points of the units around the fleet --------------------------------------------------

    def note_upstream_failure(self, instance: Instance) -> None:
        """A request could not reach the model's server: check in the background whether it died.

        A task of the fleet's own, so a client that leaves cannot cut the check short.
        """
        self.spawn(self.watch.check_exited(instance, "server exited while serving"), f"check:{instance.name}")

    def crashed(self, instance: Instance, reason: str) -> None:
        """The one way a crash comes in (liveness, the engine's return, a shared server's failure)."""
        instance.failed_probes = 0
        self.carry_out(self.scheduler.crashed(instance.name, time.monotonic(), reason))

    def server_dropped(self, instance: Instance, reason: str) -> None:
        """A shared server let the model go on its own (Ollama evicted it): shown as stopped, when idle."""
        actions = self.scheduler.unload(instance.name, time.monotonic(), reason, StopCause.SERVER)
        if actions:
            logger.bind(model=instance.name).warning("{}", reason)
        self.carry_out(actions)

    def admit_adopted(self, instance: Instance, spec: Spec, container_id: str) -> bool:
        """A found server (or a model in one) becomes the model's, if the budget accounting allows."""
        if not self.scheduler.adopt(instance.name, spec.device, time.monotonic()):
            return False
        instance.spec, instance.container_id, instance.ready_at = spec, container_id, time.time()
        self._publish_phases()
        return True

    def _sockets_in_use(self) -> set[str]:
        in_use = self.ledger.launching_sockets() | {
            i.spec.endpoint.socket for i in self.instances.values() if i.spec is not None and i.spec.endpoint.socket
        }
        return in_use.union(*(h.endpoints() for h in self.hostings.values()))

    # -- lifecycle ---------------------------------------------------------------

    async def tick(self) -> None:
        """Periodic: refresh measured GPU memory and what each model uses, expire waits, unload idle models."""
        if self.meter is not None:
            try:
                self.scheduler.set_devices(await self.meter.read_devices())
            except Exception:
                logger.opt(exception=True).warning("reading GPU memory failed; keeping the last reading")
        for check in [h.observe for h in self.hostings.values()] + [self.adopter.sweep_if_pending]:
            try:  # what each model uses, models a shared server let go, and a sweep that could not run before
                await check()
            except Exception:
                logger.opt(exception=True).warning("a periodic check failed; trying again next tick")
        self.carry_out(self.scheduler.tick(time.monotonic()))

    async def start_models(self, names: list[str]) -> None:
        """Start these models as if each had a request; each lets go as soon as it is ready."""

        async def start(name: str) -> None:
            try:
                async with self.use(name, served=False):
                    pass
            except LocalllmError as exc:
                logger.bind(model=name).error("start failed: {}", exc.message)

        await asyncio.gather(*(start(name) for name in names))

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
        await asyncio.gather(*(h.shutdown() for h in self.hostings.values()), return_exceptions=True)
        self.ledger.forget_protected()  # at shutdown everything of ours goes
        try:
            await self.adopter.remove_leftovers()
            await self.runtime.remove_networks(self.settings.instance)
        except LocalllmError as exc:
            logger.error("final sweep for leftover containers failed: {}", exc.message)
        if self._wakeup is not None:
            self._wakeup.cancel()

    # -- config changes (carried out by rollout.py) ------------------------------------

    def replace_catalog(self, config: Config, instances: dict[str, Instance], sizings: dict[str, Sizing]) -> None:
        """A config change's catalog goes live (``Switching.commit``); models that left are published as removed."""
        self._publish_phases()
        for name in set(self.instances) - set(instances):
            before = self.scheduler.view(name).phase
            self.events.publish(
                EventKind.STATE,
                f"{before} -> removed (no longer in the catalog)",
                name,
                **{"from": str(before), "to": "removed"},
            )
        self.config, self.instances = config, instances
        self._by_name = {name: instances[e.name] for e in config.models for name in e.names}
        self.carry_out(
            self.scheduler.replace_slots([self._slot_for(e, sizings[e.name]) for e in config.models], time.monotonic())
        )

    # -- carrying out the scheduler's actions --------------------------------------

    def carry_out(self, actions: list[Action]) -> None:
        """Act on what the scheduler returned; called with no ``await`` since the scheduler call."""
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
                    self.events.publish(
                        EventKind.RESTART,
                        f"starting again after {failures} failure(s)",
                        action.model,
                        failures=failures,
                    )
                self.spawn(self._start(action.model), f"start:{action.model}")
            elif isinstance(action, Stop):
                log = logger.bind(model=action.model)
                (log.error if action.crashed else log.info)("stop: {}", action.reason)
                kind = stop_event_kind(action.cause)
                self.events.publish(kind, action.reason, action.model, reason=action.reason, cause=action.cause)
                self.spawn(self._stop(action.model, action.reason if action.crashed else None), f"stop:{action.model}")
            elif isinstance(action, Note):
                logger.bind(model=action.model).info("{}", action.message)
        self._publish_phases()
        self._arm_wakeup()

    def _publish_phases(self) -> None:
        """One ``state`` event per phase change the scheduler made (``Scheduler.moves``), in order."""
        for move in self.scheduler.moves():
            self.events.publish(
                EventKind.STATE,
                f"{move.before} -> {move.after}",
                move.model,
                **{"from": str(move.before), "to": str(move.after)},
            )

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
            self.carry_out(self.scheduler.tick(time.monotonic()))

    def spawn(self, coroutine: Coroutine, name: str) -> asyncio.Task:
        """Run ``coroutine`` as one of the fleet's tasks: cancelled at shutdown, its failure logged."""
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

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
            await self.hosting_of(instance.entry).start(instance, self.scheduler.slots[name].device)
        except asyncio.CancelledError:
            await self.stop_quietly(instance)
            raise
        except Exception as exc:  # whatever went wrong, the scheduler hears about it
            error = exc if isinstance(exc, LocalllmError) else ModelStartFailed(name, f"unexpected error: {exc!r}")
            if not isinstance(exc, LocalllmError):
                log.opt(exception=exc).error("unexpected error while starting")
            await self.stop_quietly(instance)
            instance.error = error.message
            log.error("start failed: {}", error.message)
            self.events.publish(EventKind.LOAD_FAILED, error.message, name, error=error.message)
            self.carry_out(self.scheduler.started(name, time.monotonic(), error))
            return
        instance.load_seconds = time.monotonic() - started
        instance.ready_at = time.time()
        log.info("ready in {:.2f}s", instance.load_seconds)
        self.carry_out(self.scheduler.started(name, time.monotonic()))
        self.events.publish(
            EventKind.LOAD,
            f"ready in {instance.load_seconds:.2f}s",
            name,
            seconds=round(instance.load_seconds, 4),
            container=(instance.container_id or "")[:12],
        )

    async def _stop(self, name: str, crash_reason: str | None = None) -> None:
        """Take the model down (keeping a crashed one's last words); always report ``stopped``."""
        instance = self.instances[name]
        hosting = self.hosting_of(instance.entry)
        device = self.device(self.scheduler.slots[name].device)
        error: LocalllmError | None = None
        try:
            held, figure = await self.meter.held(instance, device, hosting.shared) if self.meter else ({}, 0)
            self.measuring.finish_run(instance)
            if crash_reason is not None:
                error = await hosting.crash_report(instance, crash_reason)
                instance.error = error.message
                logger.bind(model=name).error("{}", error.message)
            await hosting.stop(instance, 0 if crash_reason else None, crashed=bool(crash_reason))
            if held and device is not None and self.meter is not None:
                await self.meter.wait_memory_back(name, device, held, figure)
        except Exception as exc:  # never leave the scheduler waiting for this stop
            failure = exc if isinstance(exc, LocalllmError) else LocalllmError(repr(exc))
            instance.error, self.adopter.pending = f"stop failed: {failure.message}", True  # swept when it can be
            logger.bind(model=name).opt(exception=exc).error("{}", instance.error)
            error = error or failure
        finally:
            self.carry_out(self.scheduler.stopped(name, time.monotonic(), error))

    async def stop_quietly(self, instance: Instance) -> None:
        """Take down what a failed or cancelled start left; a failure is logged (the sweeps remove it later)."""
        try:
            await self.hosting_of(instance.entry).stop(instance, None, crashed=False)
        except LocalllmError as exc:
            self.adopter.pending = True  # the next tick's sweep removes it, once the engine lets it
            logger.bind(model=instance.name).error("could not remove its container ({}); swept later", exc.message)
