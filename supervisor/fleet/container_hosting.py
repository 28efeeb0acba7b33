"""One container per model (llama.cpp's llama-server): each model's server started, gated and stopped alone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from supervisor.config.policy import escapes
from supervisor.config.settings import Config, ModelEntry
from supervisor.core.backends import backend_for
from supervisor.core.containers import ContainerSpec, Endpoint
from supervisor.core.errors import LocalllmError, ModelStartFailed
from supervisor.core.slots import Phase
from supervisor.fleet.adoption import Wanted
from supervisor.fleet.events import EventKind
from supervisor.fleet.hosting import crash_report
from supervisor.fleet.instance import Instance, Spec
from supervisor.fleet.sizing import size_model
from supervisor.runtime.container_runtime import ContainerInfo
from supervisor.runtime.health import probe, wait_until_ready
from supervisor.runtime.upstream import server_user

if TYPE_CHECKING:
    from supervisor.fleet.owner import Fleet

DISCARD_ATTEMPTS = 3


class ContainerHosting:
    shared = False
    sizes_itself = False
    busy_status = None
    server_label = None

    def __init__(self, fleet: Fleet, backend: str):
        self.fleet = fleet
        self.backend = backend_for(backend)

    def devices(self, config: Config) -> tuple[str, ...]:
        return ()

    def spec_for(self, entry: ModelEntry, endpoint: Endpoint, device_id: str | None, config: Config) -> ContainerSpec:
        fleet = self.fleet
        try:
            return self.backend.container_spec(
                entry,
                fleet.profile,
                fleet.settings,
                endpoint,
                fleet.device(device_id),
                self._memory_need(entry),
                server_user(),
            )
        except ValueError as exc:  # no such GPU here: say so rather than run it on every GPU
            raise ModelStartFailed(entry.name, str(exc)) from None

    def _memory_need(self, entry: ModelEntry) -> int | None:
        """What a CPU container's memory limit is derived from: the config's own figure (declared or estimated),
        never a measured one, so the spec's hash stays put while the model runs. None on GPU profiles."""
        fleet = self.fleet
        if fleet.profile.has_gpus:
            return None
        instance = fleet.instances.get(entry.name)
        same = instance is not None and instance.entry == entry
        sizing = instance.sizing if same else size_model(entry, fleet.profile)
        return sizing.declared or (sizing.estimate.total if sizing.estimate else sizing.fallback) or None

    async def start(self, instance: Instance, device_id: str | None) -> None:
        """Create the model's own container, wait for its readiness gate, and (on a GPU) find it there."""
        fleet, name, entry = self.fleet, instance.name, instance.entry
        _check_model_file(entry)
        self._check_models_root(entry)
        endpoint = fleet.endpoints.new(name)
        instance.spec = self.spec_for(entry, endpoint, device_id, fleet.config)
        info = await fleet.runtime.run(instance.spec)  # a cancelled start leaves no container: the runtime removes it
        instance.container_id = info.id
        logger.bind(model=name).info("container {} started ({})", info.name, endpoint)
        await wait_until_ready(
            fleet.runtime,
            fleet.session,
            model=name,
            container_id=info.id,
            url=endpoint.url + self.backend.readiness_path,
            deadline=entry.startup_timeout or fleet.settings.startup_timeout,
        )
        if fleet.meter is not None:  # a ready GPU model must show up in NVML on its GPU
            used = await fleet.meter.on_its_gpu(instance, fleet.device(device_id))
            if used:
                fleet.measuring.observe(instance, used)

    def _check_models_root(self, entry: ModelEntry) -> None:
        """The policy's models_root, again at the start: the file checked at apply may be a symlink now."""
        policy = self.fleet.settings.policy
        if policy is not None and policy.models_root is not None and entry.gguf is not None:
            problem = escapes(entry.gguf, Path(os.path.realpath(policy.models_root)))
            if problem:
                raise ModelStartFailed(entry.name, f"refused by the policy: {problem}")

    async def stop(self, instance: Instance, grace: float | None, crashed: bool) -> None:
        """Stop and remove the model's container; the id is forgotten only once it is really gone."""
        fleet, container_id = self.fleet, instance.container_id
        if container_id is not None:
            for attempt in range(DISCARD_ATTEMPTS):
                try:
                    await fleet.runtime.stop_and_remove(
                        container_id, fleet.settings.stop_grace if grace is None else grace
                    )
                    break
                except LocalllmError as exc:
                    if attempt == DISCARD_ATTEMPTS - 1:
                        raise
                    logger.bind(model=instance.name).warning(
                        "removing {} failed ({}); retrying", container_id[:12], exc.message
                    )
                    await asyncio.sleep(0.5 * 2**attempt)
            logger.bind(model=instance.name).info("container {} stopped and removed", container_id[:12])
        instance.forget_server(container_id)

    async def launch(self, entry: ModelEntry, device_id: str | None, config: Config) -> tuple[Spec, str]:
        """Start ``entry`` in a container of its own beside whatever runs, and gate it.

        The container is protected from sweeps until the fleet commits, attaches or abandons it.
        """
        fleet = self.fleet
        _check_model_file(entry)
        endpoint = fleet.endpoints.new(entry.name)
        container_id: str | None = None
        with fleet.ledger.launching(endpoint):
            try:
                spec = self.spec_for(entry, endpoint, device_id, config)
                container_id = (await fleet.runtime.run(spec)).id
                fleet.ledger.protect(container_id)
                await wait_until_ready(
                    fleet.runtime,
                    fleet.session,
                    model=entry.name,
                    container_id=container_id,
                    url=endpoint.url + self.backend.readiness_path,
                    deadline=entry.startup_timeout or fleet.settings.startup_timeout,
                )
                return spec, container_id
            except BaseException:
                if container_id is not None:
                    fleet.ledger.unprotect(container_id)
                    with contextlib.suppress(LocalllmError):
                        await fleet.runtime.stop_and_remove(container_id, 0)
                raise

    async def abandon(self, name: str, spec: Spec, container_id: str) -> None:
        try:
            await self.fleet.runtime.stop_and_remove(container_id, 0)
        except LocalllmError as exc:
            logger.bind(model=name).error("could not remove {}: {}", container_id[:12], exc.message)
        self.fleet.ledger.unprotect(container_id)

    def retire(self, name: str, container_id: str, patience: float, entry: ModelEntry) -> None:
        """Stop a container no model uses any more, once the requests it still serves are done."""
        fleet = self.fleet

        async def drain_then_stop() -> None:
            try:
                deadline = time.monotonic() + patience
                while fleet.ledger.in_flight_on(container_id) > 0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                await fleet.runtime.stop_and_remove(container_id, fleet.settings.stop_grace)
                logger.bind(model=name).info("retired container {}", container_id[:12])
            finally:
                fleet.ledger.retired(container_id)

        fleet.ledger.protect(container_id)  # sweeps leave it alone while it drains
        fleet.spawn(drain_then_stop(), f"retire:{name}")

    async def crash_report(self, instance: Instance, reason: str) -> LocalllmError:
        return await crash_report(self.fleet.runtime, instance, reason)

    async def observe(self) -> None:
        """Every tick, on a GPU host: what each ready model's processes use on its GPU."""
        fleet = self.fleet
        if fleet.meter is None:
            return
        ready = [
            i
            for i in fleet.instances_of(self)
            if fleet.phase(i) is Phase.READY and i.container_id and i.sizing.launch.on_gpu
        ]
        if not ready:
            return
        used = await fleet.meter.used_by(i.container_id for i in ready if i.container_id)
        for instance in ready:
            if instance.container_id in used:
                fleet.measuring.observe(instance, used[instance.container_id])

    async def estimate(self, instance: Instance) -> dict | None:
        return None

    def wanted(self, info: ContainerInfo, endpoint: Endpoint, config: Config) -> Wanted:
        return Wanted()  # no server of its own: a container of no model is no one's

    async def adopt(self, info: ContainerInfo, spec: Spec, instance: Instance | None) -> str | None:
        """Take a model's container as its own once it answers and fits; or say why not."""
        fleet = self.fleet
        if instance is None:
            return "no model of the catalog runs in it"
        if await probe(fleet.session, spec.endpoint.url + self.backend.readiness_path, timeout=2.0) != 200:
            return "its server is not healthy"
        if not fleet.admit_adopted(instance, spec, info.id):
            return "it does not fit the memory budget"
        logger.bind(model=instance.name).info("adopted running container {} ({})", info.name, spec.endpoint)
        fleet.events.publish(
            EventKind.ADOPT, f"adopted running container {info.name}", instance.name, container=info.id[:12]
        )
        return None

    def replaces_server(self, config: Config) -> bool:
        return False

    def endpoints(self) -> set[str]:
        return set()

    def containers(self) -> set[str]:
        return set()

    async def shutdown(self) -> None:
        await asyncio.gather(*(self.fleet.stop_quietly(i) for i in self.fleet.instances_of(self)))


def _check_model_file(entry: ModelEntry) -> None:
    if entry.gguf is None or not entry.gguf.is_file():
        raise ModelStartFailed(entry.name, f"model file {entry.gguf} does not exist")
