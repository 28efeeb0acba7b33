"""The fleet's hands for a config change (``rollout.py`` decides, these act).

A changed model is launched beside the old one where there is room (its room reserved in the
scheduler until it is committed, attached or abandoned), or its old self is taken offline first.
``Fleet.commit`` then makes the new catalog live; what served the old one is retired once drained.
Everything goes through the scheduler's methods and the fleet's entry points.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from loguru import logger

from supervisor.config.settings import Config, ModelEntry
from supervisor.core.errors import ModelStayedBusy, ShuttingDown
from supervisor.core.slots import Phase
from supervisor.fleet.instance import Instance, Spec
from supervisor.fleet.sizing import Sizing

if TYPE_CHECKING:
    from supervisor.fleet.owner import Fleet


class Switching:
    def __init__(self, fleet: Fleet):
        self.fleet = fleet

    def ready_specs(self) -> dict[str, Spec]:
        fleet = self.fleet
        return {
            i.name: i.spec
            for i in fleet.instances.values()
            if fleet.phase(i) is Phase.READY and i.spec is not None and i.container_id
        }

    def room_on(self, device_id: str) -> int:
        scheduler = self.fleet.scheduler
        device = next(d for d in scheduler.devices if d.id == device_id)
        return device.budget - sum(r.bytes for r in scheduler.residents() if r.device == device_id)

    async def launch(
        self, entry: ModelEntry, device_id: str | None, need: int, config: Config | None = None
    ) -> tuple[Spec, str]:
        """Start ``entry`` beside whatever runs, and gate it (``Hosting.launch``).

        Its room stays reserved until ``Fleet.commit`` or ``attach`` takes it, or ``abandon`` removes it.
        """
        fleet = self.fleet
        if fleet.closing:
            raise ShuttingDown("localllmd is shutting down")
        fleet.scheduler.reserve_launch(entry.name, device_id or "", need)
        try:
            return await fleet.hosting_of(entry).launch(entry, device_id, config or fleet.config)
        except BaseException:
            if not self._keeps_room(entry.name):
                fleet.scheduler.release_launch(entry.name)
            raise

    async def abandon(self, name: str, spec: Spec, container_id: str) -> None:
        """Remove what a config change launched but will not use."""
        fleet = self.fleet
        if not self._keeps_room(name):
            fleet.scheduler.release_launch(name)
        entry = fleet.instances[name].entry if name in fleet.instances else fleet.config.model_named(name)
        await fleet.hosting_of(entry).abandon(name, spec, container_id)

    async def take_offline(self, name: str, patience: float, next_need: int = 0) -> None:
        """Hold ``name`` (no starts), wait until it is idle, stop it and wait until it is gone. With ``next_need``,
        the room it frees is held for its next version (``Scheduler.hand_over``), not given to a waiting model."""
        fleet = self.fleet
        fleet.scheduler.hold(name)
        if next_need:
            fleet.scheduler.hand_over(name, next_need)
        deadline = time.monotonic() + patience
        while fleet.scheduler.view(name).in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        fleet.carry_out(fleet.scheduler.unload(name, time.monotonic(), "replaced by a new config"))
        while fleet.scheduler.view(name).phase not in (Phase.STOPPED, Phase.FAILED):
            if time.monotonic() > deadline:
                raise ModelStayedBusy(f"'{name}' stayed busy for {patience:g}s; try the change again later")
            await asyncio.sleep(0.05)

    def _keeps_room(self, name: str) -> bool:
        """A model the change took offline keeps its room held until it is attached or released: if its new version
        fails, its old one comes back in that room, and no waiting model may take it meanwhile (the soak saw the
        revert's relaunch pass its gate and find its room gone)."""
        try:
            view = self.fleet.scheduler.view(name)
        except KeyError:  # a model the change adds: nothing of it was taken offline
            return False
        return view.held and view.phase is not Phase.READY

    def attach(self, name: str, spec: Spec, container_id: str) -> bool:
        """Give a stopped, held model the server a config change started for it, and let it serve."""
        fleet = self.fleet
        instance = fleet.instances[name]
        fleet.scheduler.release(name)
        attached = fleet.admit_adopted(instance, spec, container_id)  # in the room its launch held, if any
        fleet.scheduler.release_launch(name)
        if attached:
            instance.error = None
            fleet.ledger.unprotect(container_id)
        else:
            logger.bind(model=name).error("could not take its new container (it changed meanwhile); removing it")
            self.retire(name, container_id, 0, instance.entry)
        fleet.carry_out(fleet.scheduler.tick(time.monotonic()))
        return attached

    def release_hold(self, name: str) -> None:
        fleet = self.fleet
        if name in fleet.instances:
            fleet.scheduler.release(name)
            fleet.scheduler.release_launch(name)  # the room it kept, if it was offline
            fleet.carry_out(fleet.scheduler.tick(time.monotonic()))

    def commit(
        self, config: Config, sizings: dict[str, Sizing], switched: dict[str, tuple[Spec, str]]
    ) -> list[tuple[str, str, ModelEntry]]:
        """Make ``config`` the live catalog; running models in ``switched`` move to their new servers.

        Returns the (model, container id, its old entry) to retire: replaced containers and removed models'.
        """
        fleet = self.fleet
        retire: list[tuple[str, str, ModelEntry]] = []
        instances: dict[str, Instance] = {}
        for entry in config.models:
            instance = fleet.instances.get(entry.name) or Instance(entry, sizings[entry.name])
            old_entry, instance.entry, instance.sizing = instance.entry, entry, sizings[entry.name]
            if entry.name in switched:
                spec, container_id = switched[entry.name]
                fleet.scheduler.release_launch(entry.name)
                ready = entry.name in fleet.instances and fleet.scheduler.view(entry.name).phase is Phase.READY
                if ready and instance.container_id:
                    retire.append((entry.name, instance.container_id, old_entry))
                    instance.spec, instance.container_id = spec, container_id
                    instance.ready_at, instance.error = time.time(), None
                    fleet.ledger.unprotect(container_id)
                else:  # it stopped or crashed while the new one started: the new one is not needed
                    retire.append((entry.name, container_id, entry))
            instances[entry.name] = instance
        for name, instance in fleet.instances.items():
            if name not in instances and instance.container_id:
                retire.append((name, instance.container_id, instance.entry))
        fleet.replace_catalog(config, instances, sizings)
        for instance in instances.values():  # what its server reported beats the placeholder of a new sizing
            if fleet.hosting_of(instance.entry).sizes_itself and instance.measured and not instance.entry.memory:
                fleet.measuring.set_need(instance.name, instance.measured)
        return retire

    def retire(self, name: str, container_id: str, patience: float, entry: ModelEntry) -> None:
        """Let go of what served ``entry`` once the requests it still serves are done (``Hosting.retire``)."""
        self.fleet.hosting_of(entry).retire(name, container_id, patience, entry)
