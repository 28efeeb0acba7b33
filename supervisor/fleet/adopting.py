"""Carrying out ``adoption.plan``: at start-up (adopt, recreate, remove), when the engine comes back, at shutdown.

Each found container gets the spec it should have: a model's from its hosting's ``spec_for``, a
hosting's own server from its ``wanted``; the plan then says what to do with each, and this does it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loguru import logger

from supervisor.core.containers import LABEL_DEVICE, LABEL_ENDPOINT, LABEL_MODEL, LABEL_OWNER, Endpoint
from supervisor.core.errors import LocalllmError
from supervisor.core.slots import Phase
from supervisor.fleet import adoption
from supervisor.runtime.container_runtime import ContainerInfo

if TYPE_CHECKING:
    from supervisor.fleet.owner import Fleet


class Adopter:
    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.pending = False  # a sweep is due that could not run (a start was in progress, or a removal failed)

    async def adopt_existing(self) -> list[str]:
        """Reconcile our containers found at start-up; returns the models to start again.

        Adopted: running, same config hash, healthy, and fitting the budget (same container, not restarted).
        Removed: not in the catalog, not running, a duplicate, unhealthy, or over budget.
        Recreated: those whose config changed (the caller starts them again).
        Containers without our owner label are never looked at.
        """
        fleet = self.fleet
        found = await fleet.runtime.list_labelled({LABEL_OWNER: fleet.settings.instance})
        recreate: list[str] = []
        for step in adoption.plan(found, {info.id: self._wanted(info) for info in found}):
            reason: str | None = step.reason
            if step.action is adoption.Action.ADOPT:
                instance = fleet.instances.get(step.model)
                hosting = fleet.hosting_of(instance.entry) if instance else fleet.server_hosting(step.model)
                reason = await hosting.adopt(step.container, step.spec, instance) if hosting else "no one's"
                if reason is None:
                    continue
            elif step.action is adoption.Action.RECREATE and step.model in fleet.instances:
                recreate.append(step.model)
            logger.bind(model=step.model or "?").warning("removing container {}: {}", step.container.name, reason)
            await fleet.runtime.stop_and_remove(step.container.id, fleet.settings.stop_grace)
        return recreate

    def _wanted(self, info: ContainerInfo) -> adoption.Wanted:
        """The spec a found container should have, from its labels (endpoint, device) and today's config."""
        fleet = self.fleet
        model = info.labels.get(LABEL_MODEL, "")
        instance = fleet.instances.get(model)
        server = fleet.server_hosting(model)
        if instance is None and server is None:
            return adoption.Wanted()
        try:
            endpoint = Endpoint.from_label(info.labels.get(LABEL_ENDPOINT, ""))
        except ValueError:
            return adoption.Wanted(problem="its endpoint label is unreadable (made by an older localllm)")
        if endpoint.socket is None:
            return adoption.Wanted(problem="its config changed (it listens on a port, not a socket)")
        if instance is None:
            assert server is not None
            return server.wanted(info, endpoint, fleet.config)
        device = fleet.device(info.labels.get(LABEL_DEVICE))
        if device is None:
            return adoption.Wanted(problem="its config changed (its device is not one of this host's now)")
        try:
            return adoption.Wanted(
                spec=fleet.hosting_of(instance.entry).spec_for(instance.entry, endpoint, device.id, fleet.config)
            )
        except LocalllmError as exc:
            return adoption.Wanted(problem=exc.message)

    async def reconcile(self) -> None:
        """Compare our containers with what we believe runs: lost ones are crashes, unowned ones go."""
        fleet = self.fleet
        found = {c.id: c for c in await fleet.runtime.list_labelled({LABEL_OWNER: fleet.settings.instance})}
        for instance in fleet.instances.values():
            info = found.get(instance.container_id or "")
            if fleet.phase(instance) is Phase.READY and (info is None or info.exited):
                fleet.crashed(instance, "container lost while the Docker engine was away")
        await self.sweep(list(found.values()), grace=0)

    async def sweep_if_pending(self) -> None:
        """Each tick: the sweep that a failed removal calls for."""
        if not self.pending:
            return
        fleet = self.fleet
        self.pending = False
        try:
            await self.sweep(await fleet.runtime.list_labelled({LABEL_OWNER: fleet.settings.instance}), grace=0)
        except LocalllmError:
            self.pending = True  # the engine is away (the engine watch says so): the next tick tries again

    def _starting_sockets(self) -> set[str]:
        """The sockets of the containers being created now: no model owns them yet, and no sweep may take them.

        Every start has a fresh socket, named in its container's endpoint label, and its spec is set before
        the engine is asked: a model's start, a config change's launch, a hosting's own server."""
        fleet = self.fleet
        starting = {
            i.spec.endpoint.socket for i in fleet.instances.values() if fleet.phase(i) is Phase.STARTING and i.spec
        }
        starting |= fleet.ledger.launching_sockets()
        return {s for s in starting.union(*(h.endpoints() for h in fleet.hostings.values())) if s}

    async def remove_leftovers(self) -> int:
        """The shutdown sweep: remove every container of ours that no model owns (e.g. a cancelled start's)."""
        fleet = self.fleet
        found = await fleet.runtime.list_labelled({LABEL_OWNER: fleet.settings.instance})
        return await self.sweep(found, grace=fleet.settings.stop_grace)

    async def sweep(self, found: list[ContainerInfo], grace: float) -> int:
        """Remove the found containers no model owns (``adoption.plan``, sweeping); return how many.

        A model owns its container while it starts, serves or stops; a stopped or failed model's is a leftover
        (a removal that failed). One left alone that is not running keeps a sweep due at the next tick.
        """
        fleet = self.fleet
        live = (Phase.STARTING, Phase.READY, Phase.STOPPING)
        owned = {i.container_id for i in fleet.instances.values() if i.container_id and fleet.phase(i) in live}
        owned |= fleet.ledger.protected()
        owned = owned.union(*(h.containers() for h in fleet.hostings.values()))  # their own servers
        starting = self._starting_sockets()
        owned |= {info.id for info in found if _socket_of(info) in starting}
        steps = adoption.plan(found, {}, frozenset(owned), sweep_only=True)
        if any(step.action is adoption.Action.LEAVE and not step.container.running for step in steps):
            self.pending = True  # a start, a stop or a crash not yet seen: look again once it is over
        removals = [step for step in steps if step.action is adoption.Action.REMOVE]
        for step in removals:
            logger.warning("removing container {}: {}", step.container.name, step.reason)
            await fleet.runtime.stop_and_remove(step.container.id, grace)
            for instance in fleet.instances.values():
                instance.forget_server(step.container.id)
        return len(removals)


def _socket_of(info: ContainerInfo) -> str | None:
    try:
        return Endpoint.from_label(info.labels.get(LABEL_ENDPOINT, "")).socket
    except ValueError:
        return None
