"""Watching what runs: liveness probes of the ready models, and the Docker engine's presence.

``Watch`` reports to the fleet through one entry point, ``Fleet.crashed(instance, reason)``: a
container that exited or vanished is a crash at once, a server that stops answering its readiness
path is one after ``liveness.failure_threshold`` failed probes (three times that while it serves:
a busy CPU answers late). The engine is pinged with backoff while it is away; what still runs
keeps serving meanwhile, and ``Fleet.reconcile`` runs when it answers again.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from loguru import logger

from supervisor.core.backends import backend_for
from supervisor.core.errors import LocalllmError
from supervisor.core.slots import Phase
from supervisor.fleet.events import EventKind
from supervisor.runtime.health import probe

if TYPE_CHECKING:
    from supervisor.fleet.owner import Fleet, Instance

ENGINE_CHECK = 2.0  # seconds between engine pings while it answers...
ENGINE_MAX_DELAY = 30.0  # ...and the longest wait between tries while it does not
BUSY_PATIENCE = 3  # a busy server's probe timeouts count against three times the liveness threshold


class Watch:
    def __init__(self, fleet: Fleet):
        self.fleet = fleet

    async def probe_liveness(self) -> None:
        """Periodic: probe every ready model; replace the dead at once and the hung after the threshold."""
        try:
            await self._probe_liveness()
        except Exception:
            logger.opt(exception=True).error("liveness probing failed; trying again next period")

    async def _probe_liveness(self) -> None:
        fleet, liveness = self.fleet, self.fleet.settings.liveness
        ready = [i for i in fleet.instances.values() if fleet.phase(i) is Phase.READY and i.spec is not None]
        answers = await asyncio.gather(
            *(
                probe(fleet.session, i.base_url + backend_for(i.entry.backend).readiness_path, liveness.timeout)
                for i in ready
            )
        )
        for instance, answer in zip(ready, answers, strict=True):
            if answer == 200:
                instance.failed_probes = 0
                continue
            instance.failed_probes += 1
            seen = f"HTTP {answer}" if answer else f"no answer within {liveness.timeout:g}s"
            fleet.events.publish(
                EventKind.HEALTH_FAILURE,
                f"liveness probe failed ({seen})",
                instance.name,
                failures=instance.failed_probes,
                seen=seen,
            )
            if await self.check_exited(instance, "server exited"):
                continue
            busy = answer is None and fleet.scheduler.view(instance.name).in_flight > 0
            threshold = liveness.failure_threshold * (BUSY_PATIENCE if busy else 1)
            if instance.failed_probes >= threshold and fleet.phase(instance) is Phase.READY:
                fleet.crashed(instance, f"server unhealthy: {instance.failed_probes} failed probes ({seen})")

    async def check_exited(self, instance: Instance, reason: str) -> bool:
        """If the ready model's container has exited (or vanished), report it crashed; True when it was."""
        fleet, container_id = self.fleet, instance.container_id
        if fleet.phase(instance) is not Phase.READY or container_id is None:
            return False
        info = await fleet.runtime.inspect(container_id)
        if info is not None and not info.exited:
            return False  # running, or paused: the liveness threshold decides
        if instance.container_id != container_id or fleet.phase(instance) is not Phase.READY:
            return True  # someone else already acted on it
        fleet.crashed(instance, reason)
        return True

    async def watch_engine(self) -> None:
        """For the daemon's life: notice the engine going away and coming back, then reconcile."""
        fleet, delay, down_since = self.fleet, ENGINE_CHECK, None
        while True:
            try:
                await fleet.runtime.ping()
            except LocalllmError as exc:
                fleet.engine_problem = exc.message
                if down_since is None:
                    down_since = time.monotonic()
                    logger.error("{}; serving what still runs, checking again with backoff", exc.message)
                delay = min(ENGINE_MAX_DELAY, delay * 2)
            else:
                fleet.engine_problem = None
                if down_since is not None:
                    logger.warning("Docker engine is back after {:.0f}s; reconciling", time.monotonic() - down_since)
                    down_since, delay = None, ENGINE_CHECK
                    try:
                        await fleet.adopter.reconcile()
                    except LocalllmError as exc:
                        logger.error("reconcile failed: {}", exc.message)
            await asyncio.sleep(delay)
