"""Applying a new config while serving: a numbered generation, health-gated, reverted on failure.

In order: validate; hash each running model's wanted container (compose's way);
change only the containers whose hash differs; gate each new container within
its deadline. Where the memory budget allows, the new container starts beside
the old one, which keeps serving until the switch and is retired once its
requests are done (zero downtime). Otherwise the old one stops first.

If any new container fails its gate, nothing is switched: the new containers
go, models stopped for the change come back with their last-good spec, and the
generation is recorded as failed. A generation becomes last-good only once it
passed. If a model cannot even be brought back, the daemon says it is
degraded and does not try again on its own: it never reverts into a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from loguru import logger

from supervisor.config.settings import Config, ModelEntry, load_config
from supervisor.core.containers import ContainerSpec
from supervisor.core.errors import ApplyFailed, ApplyRefused, ConfigError, Conflict, LocalllmError, ShuttingDown
from supervisor.core.slots import Phase
from supervisor.fleet.events import EventKind
from supervisor.fleet.owner import Fleet
from supervisor.fleet.sizing import Sizing, size_catalog
from supervisor.state.generations import ChangePlan, GenerationStatus, GenerationStore, plan_change, split_secrets

DRAIN_PATIENCE = 120.0  # seconds a replaced container may finish its requests


class ApplyStep(StrEnum):
    """An ``apply`` event's ``status`` while the change is under way; it ends with a ``GenerationStatus``."""

    APPLYING = "applying"  # the plan is made and the generation recorded
    STOPPING_OLD = "stopping_old"  # a model's old version stops first (no room for both, or Ollama)
    LAUNCHING = "launching"  # a model's new version starts
    HEALTHY = "healthy"  # a model's new version passed its health gate


@dataclass(frozen=True)
class SwitchRequest:
    """One config change, as planned: what ``_switch`` starts, commits, or reverts."""

    number: int  # the generation
    config: Config
    sizings: dict[str, Sizing]  # every model of ``config``
    plan: ChangePlan
    running: dict[str, ContainerSpec]  # the ready models' specs before the change
    entries: dict[str, ModelEntry]  # ``config``'s models by name
    reloading: tuple[str, ...]  # Ollama models to replace: all offline before the first launch
    report: dict  # what the answer carries so far (generation, source, plan)


class Rollout:
    def __init__(self, fleet: Fleet, store: GenerationStore):
        self.fleet = fleet
        self.store = store
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None  # the apply under way

    async def apply(self, text: str, source: str, path: Path, rollback_to: int | None = None) -> dict:
        """Apply ``text`` (a config file's content, read from ``path``); returns the report or raises."""
        if self._lock.locked():
            raise Conflict("another apply or rollback is in progress; try again when it is done")
        if self.fleet.closing:
            raise ShuttingDown("localllmd is shutting down")
        async with self._lock:
            self._task = asyncio.current_task()
            if rollback_to is not None:
                self.fleet.events.publish(
                    EventKind.ROLLBACK, f"rolling back to generation {rollback_to}", generation=rollback_to
                )
            try:
                config = load_config(path, text=text, running=self.fleet.config)
                self._refuse_restart_only_changes(config)
            except (ConfigError, ApplyRefused) as exc:
                number = self.store.record(text, source, {}, path).number
                self.store.mark(number, GenerationStatus.INVALID, exc.message)
                self._event(number, GenerationStatus.INVALID, exc.message)
                logger.bind(generation=number).error("generation {} refused: {}", number, exc.message)
                raise
            return await self._apply(config, text, source, path)

    async def cancel(self) -> None:
        """Shutdown: stop the apply under way (it reverts what it can) and wait for it."""
        task = self._task
        if task is not None and not task.done() and self._lock.locked():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    async def preview(self, text: str, source: str, path: Path) -> dict:
        """What applying ``text`` would do, without doing it: validation, the plan and the text's diff.

        The diff is of the texts as stored, secrets redacted: a viewer may validate, and must not read them."""
        config = load_config(path, text=text, running=self.fleet.config)
        self._refuse_restart_only_changes(config)
        active = self.store.active
        try:
            before = self.store.text_of(active) if active is not None else ""
        except OSError:
            before = ""
        after = split_secrets(text)[0]
        diff = difflib.unified_diff(
            before.splitlines(keepends=True), after.splitlines(keepends=True), f"generation {active} (active)", source
        )
        return {
            "valid": True,
            "profile": config.profile,
            "models": len(config.models),
            "plan": asdict(self._plan(config)[0]),
            "diff": "".join(diff),
        }

    def _plan(self, config: Config):
        """The change plan for ``config`` against what runs now, and the wanted config hash of each running model."""
        fleet = self.fleet
        running = fleet.switching.ready_specs()
        wanted = {
            e.name: fleet.hosting_of(e)
            .spec_for(e, running[e.name].endpoint, running[e.name].device, config)
            .config_hash()
            for e in config.models
            if e.name in running
        }
        plan = plan_change(
            {n: s.config_hash() for n, s in running.items()},
            wanted | {e.name: "" for e in config.models if e.name not in running},
            set(fleet.instances),
        )
        return plan, running, wanted

    async def rollback(self, number: int | None) -> dict:
        """Apply a recorded generation again: ``number``, or the last good one before the active one."""
        if self._lock.locked():
            raise Conflict("another apply or rollback is in progress; try again when it is done")
        if number is None:
            earlier = [
                g for g in self.store.generations if g.status == GenerationStatus.GOOD and g.number != self.store.active
            ]
            if not earlier:
                raise ApplyRefused("there is no earlier good generation to roll back to")
            number = earlier[-1].number
        if self.store.get(number) is None:
            raise ApplyRefused(f"there is no generation {number} (see: localllmctl history)")
        try:
            text = self.store.config_text(number)  # secrets included, as it was applied
        except (OSError, ValueError) as exc:
            raise ApplyRefused(
                f"generation {number} cannot be read back: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        path = self.store.get(number).path or self.store.directory / f"{number:06d}.yaml"  # relative paths' base
        return await self.apply(text, f"rollback to generation {number}", Path(path), rollback_to=number)

    def _event(
        self, number: int, status: ApplyStep | GenerationStatus, message: str, model: str | None = None, **data
    ) -> None:
        self.fleet.events.publish(
            EventKind.APPLY, f"generation {number}: {message}", model, generation=number, status=status, **data
        )

    def _refuse_restart_only_changes(self, config: Config) -> None:
        """The profile and the daemon's settings, its policy above all, are the running daemon's own.

        The new config was already held to the running policy (``load_config(running=...)``), so a config that
        loosens the policy is refused for what it asks, and one that only rewrites it is refused here.
        """
        live = self.fleet.config
        changed = [name for name in ("profile", "profiles_dir") if getattr(config, name) != getattr(live, name)]
        if config.daemon.policy != live.daemon.policy:
            changed.append("daemon.policy")
        if config.daemon.model_copy(update={"policy": None}) != live.daemon.model_copy(update={"policy": None}):
            changed.append("daemon")
        if changed:
            raise ApplyRefused(
                f"the new config changes {', '.join(changed)}, which only a restart of localllmd "
                "applies; apply changes to the model catalog, or restart the daemon"
            )

    async def _apply(self, config: Config, text: str, source: str, path: Path) -> dict:
        fleet = self.fleet
        sizings = await asyncio.to_thread(size_catalog, config, fleet.profile, fleet.learned_sizes)
        plan, running, wanted = self._plan(config)
        entries = {e.name: e for e in config.models}
        gone = set(fleet.instances) - set(entries)  # removing a model that is starting would orphan its start
        busy = [
            n
            for n in sorted(set(plan.replace) | gone)
            if fleet.scheduler.view(n).phase in (Phase.STARTING, Phase.STOPPING)
        ]
        if busy:
            raise Conflict(f"{', '.join(busy)} is starting or stopping; try again in a moment")
        shared = [n for n, i in fleet.instances.items() if fleet.hosting_of(i.entry).shared]
        reloading = [n for n in plan.replace if n in shared]  # a shared server holds one instance of a model
        hold_shared = bool(reloading) or any(h.replaces_server(config) for h in fleet.hostings.values())
        moving = [n for n in shared if fleet.scheduler.view(n).phase in (Phase.STARTING, Phase.STOPPING)]
        if hold_shared and moving:
            raise Conflict(f"{', '.join(moving)} is starting or stopping in the Ollama server; try again in a moment")
        generation = self.store.record(text, source, wanted, path)
        report = {"generation": generation.number, "source": source, "plan": asdict(plan)}
        log = logger.bind(generation=generation.number)
        log.info(
            "applying from {}: replace {}, remove {}, add {}",
            source,
            list(plan.replace) or "-",
            list(plan.remove) or "-",
            list(plan.add) or "-",
        )
        self._event(generation.number, ApplyStep.APPLYING, f"from {source}", plan=asdict(plan))
        held = shared if hold_shared else []  # no Ollama model starts on the old server meanwhile
        for name in held:
            fleet.scheduler.hold(name)
        request = SwitchRequest(generation.number, config, sizings, plan, running, entries, tuple(reloading), report)
        offline: list[str] = []  # models stopped for the change
        try:
            return await self._switch(request, offline)
        finally:
            for name in held:
                if name not in offline:  # those are attached, or released by the revert
                    fleet.switching.release_hold(name)

    async def _switch(self, request: SwitchRequest, offline: list[str]) -> dict:
        """Start the new versions (beside the old ones where there is room), then commit, or revert.

        ``offline`` gets each model stopped for the change as it goes, so that the caller can tell them apart.
        """
        fleet, number, switched = self.fleet, request.number, {}
        log = logger.bind(generation=number)
        try:
            for name in request.reloading:  # all of them before the first launch: a new server replaces the old one
                need = request.sizings[name].need
                await self._take_offline(number, name, "Ollama holds one instance of a model", offline, need)
            for name in request.plan.replace:
                device, need = request.running[name].device, request.sizings[name].need
                if name not in offline and fleet.switching.room_on(device) < need:
                    await self._take_offline(number, name, "no room for both", offline, need)
                self._event(number, ApplyStep.LAUNCHING, f"{name}: starting its new version", name)
                switched[name] = await fleet.switching.launch(request.entries[name], device, need, request.config)
                log.info("{}: new version passed its health gate", name)
                self._event(number, ApplyStep.HEALTHY, f"{name}: new version passed its health gate", name)
        except LocalllmError as exc:
            return await self._revert(request, switched, offline, exc)
        except BaseException as exc:  # cancelled (shutdown) or a bug: put things back, then let it go on
            error = LocalllmError(f"interrupted: {exc!r}")
            with contextlib.suppress(ApplyFailed):
                await asyncio.shield(self._revert(request, switched, offline, error))
            raise
        retire = fleet.switching.commit(
            request.config, request.sizings, {n: v for n, v in switched.items() if n not in offline}
        )
        for name in offline:
            fleet.switching.attach(name, *switched[name])
        for name, container_id, entry in retire:
            fleet.switching.retire(name, container_id, DRAIN_PATIENCE, entry)
        self.store.mark(number, GenerationStatus.GOOD)
        fleet.degraded = None
        log.info("generation {} is live and is now last-good", number)
        self._event(number, GenerationStatus.GOOD, "live and now last-good")
        return {**request.report, "status": GenerationStatus.GOOD}

    async def _take_offline(self, number: int, name: str, why: str, offline: list[str], next_need: int = 0) -> None:
        logger.bind(generation=number).info("{}: {}, stopping the old one first", name, why)
        self._event(number, ApplyStep.STOPPING_OLD, f"{name}: {why}, stopping the old one first", name)
        offline.append(name)  # before waiting: a revert must release it whatever happens
        await self.fleet.switching.take_offline(name, DRAIN_PATIENCE, next_need)

    async def _revert(self, request: SwitchRequest, switched: dict, offline: list[str], error: LocalllmError) -> dict:
        """Remove what the change started (``switched``) and bring back what it stopped (``offline``); whatever
        fails is reported as degraded, and no model stays held."""
        fleet, number, running = self.fleet, request.number, request.running
        log = logger.bind(generation=number)
        log.error("generation {} failed its health gate: {}; reverting to last-good", number, error.message)
        lost = []
        for name, (spec, container_id) in switched.items():
            try:
                await fleet.switching.abandon(name, spec, container_id)
            except Exception as exc:
                lost.append(f"{name}: its new version could not be removed ({getattr(exc, 'message', exc)!s})")
        switching = fleet.switching
        for name in offline:
            entry, slot = fleet.instances[name].entry, fleet.scheduler.view(name)
            if slot.phase is Phase.READY:  # it never went offline (the wait ran out first)
                switching.release_hold(name)
                continue
            try:
                if not switching.attach(name, *await switching.launch(entry, running[name].device, slot.need)):
                    lost.append(f"{name}: its last-good container could not be attached")
            except Exception as exc:
                switching.release_hold(name)
                lost.append(f"{name}: {getattr(exc, 'message', None) or repr(exc)}")
        reason = f"health gate failed: {error.message}"
        with contextlib.suppress(LocalllmError):
            self.store.mark(number, GenerationStatus.FAILED, reason)
        if lost:
            fleet.degraded = (
                f"generation {number} failed and its last-good spec could not be brought back for "
                + "; ".join(lost)
                + "; not retrying on its own: apply a config that works"
            )
            log.error("degraded: {}", fleet.degraded)
        report = {**request.report, "status": GenerationStatus.FAILED, "reason": reason, "degraded": fleet.degraded}
        self._event(number, GenerationStatus.FAILED, f"reverted to last-good: {reason}", degraded=fleet.degraded)
        raise ApplyFailed(
            f"generation {number} failed and was reverted to last-good: {reason}"
            + (f"; DEGRADED: {fleet.degraded}" if lost else ""),
            report,
        )
