"""The fleet's GPU measurement: readings, peaks and learning, the check that a GPU model is on its GPU,
and the wait for memory to come back after a stop.

Only a GPU host whose NVML works has one (``Fleet.meter``); on a CPU host it is absent, not switched
off. It measures and learns; what the numbers mean for the budget (a model's need) stays the fleet's
and the scheduler's. Its semantics are issue 11's: a run's peak is learned at once when it is higher
than what was learned, and a lower figure only after several runs that served (``learned.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Protocol

from loguru import logger

from supervisor.config.profiles import Profile
from supervisor.core.errors import ModelStartFailed
from supervisor.core.placement import Device, devices_for
from supervisor.fleet.events import EventBus, EventKind
from supervisor.fleet.sizing import Sizing
from supervisor.runtime.gpu_watch import GpuWatch, Usage, memory_released
from supervisor.state.learned import LearnedSizes

MEMORY_POLL = 0.25  # seconds between looks at a stopped model's GPU processes...
MEMORY_WAIT = 10.0  # ...and how long they get to go before a memory_wait warning
GPU_CHECK_WAIT = 3.0  # after readiness: how long a GPU model's process gets to show up in NVML on its GPU


class Measured(Protocol):
    """What the meter reads of a model (the fleet's ``Instance``)."""

    name: str
    container_id: str | None
    sizing: Sizing
    measured: int | None


class GpuMeter:
    def __init__(
        self, watch: GpuWatch, learned: LearnedSizes | None, events: EventBus, profile: Profile, devices: list[Device]
    ):
        self.watch = watch
        self.learned = learned
        self.events = events
        self.profile = profile
        self._problems = {d.id: d.problem for d in devices}  # as last published

    async def read_devices(self) -> list[Device]:
        """The devices as NVML reads them now; one that became unusable (or usable again) is logged and
        published once."""
        devices = devices_for(self.profile, await self.watch.readings())
        for device in devices:
            before = self._problems.get(device.id)
            if device.problem == before:
                continue
            self._problems[device.id] = device.problem
            if device.problem:
                logger.bind(device=device.id).error("unusable: {}", device.problem)
                message = f"{device.id} is unusable: {device.problem}"
            else:
                logger.bind(device=device.id).warning("usable again (was: {})", before)
                message = f"{device.id} is usable again"
            self.events.publish(
                EventKind.DEVICE, message, None, device=device.id, uuid=device.uuid, problem=device.problem or None
            )
        return devices

    async def used_by(self, containers: Iterable[str]) -> dict[str, int]:
        """Bytes each container's processes hold on the GPUs now (containers holding nothing are left out)."""
        usage = await self.watch.usage(list(containers))
        return {container_id: sum(pids.values()) for container_id, pids in usage.items()}

    def learn(self, model: Measured, used: int) -> int | None:
        """A new peak of ``model``'s run: what is learned for its kind now, or None when it learns nothing."""
        if self.learned is None or not model.sizing.learned_key:
            return None
        return self.learned.record(model.sizing.learned_key, used, model.name)

    def finish_run(self, model: Measured, peak: int | None, served: int) -> int | None:
        """``model`` stopped after a run that peaked at ``peak`` and served ``served`` requests: what is
        learned now (a lower size only after several such runs), or None."""
        if not peak or not served or self.learned is None or not model.sizing.learned_key:
            return None
        return self.learned.finish_run(model.sizing.learned_key, peak, model.name)

    async def on_its_gpu(self, model: Measured, device: Device | None) -> int | None:
        """What a ready GPU model uses on its GPU; ModelStartFailed when none of its processes shows up there.

        llama-server that cannot use CUDA serves from the CPU with /health 200 and -ngl ignored, and we would
        charge GPU memory nothing uses. None when there is nothing to check (a CPU model, no index).
        """
        if device is None or device.index is None or not model.sizing.launch.on_gpu:
            return None
        container_id = model.container_id or ""
        deadline = time.monotonic() + GPU_CHECK_WAIT
        while True:
            used = sum((await self.watch.usage([container_id], device.index)).get(container_id, {}).values())
            if used:
                return used
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(MEMORY_POLL)
        raise ModelStartFailed(
            model.name,
            (
                f"the server answers, but no process of its container uses {device.id} ({device.gpu_request}) in NVML "
                f"{GPU_CHECK_WAIT:g}s after it became ready: it is running on the CPU. Likely causes: Docker gave the "
                "container no GPU (is the NVIDIA Container Toolkit installed and set up as a Docker runtime?), the "
                "driver is older than the image's CUDA needs (the container log says), or the GPU is a MIG parent; "
                "localllmd itself must run in the host's PID namespace to see the container's processes"
            ),
        )

    async def held(self, model: Measured, device: Device | None, shared: bool) -> tuple[Usage, int]:
        """What the model's container holds on ``device`` now, and how much of it stopping the model frees.

        A container of its own frees all of it; a ``shared`` server (Ollama's) frees what the model measured
        (its other runners keep theirs). A crashed container holds nothing any more: no wait.
        """
        if device is None or device.index is None or not model.container_id:
            return {}, 0
        try:
            usage = await self.watch.usage([model.container_id], device.index)
        except Exception as exc:  # NVML trouble must not stop the stop
            logger.bind(model=model.name).warning("cannot read its GPU processes ({!r}); not waiting", exc)
            return {}, 0
        held = usage.get(model.container_id, {})
        figure = (model.measured or model.sizing.need) if shared else sum(held.values())
        return held, figure

    async def wait_memory_back(self, name: str, device: Device, held: Usage, figure: int) -> None:
        """After a stop: wait until the container's processes are gone from NVML (or have freed ``figure``);
        a wait that times out is a ``memory_wait`` warning with the numbers."""
        deadline = time.monotonic() + MEMORY_WAIT
        now: Usage = held
        while time.monotonic() < deadline:
            now = await self.watch.held_by(held, device.index)
            if memory_released(held, now, figure):
                return
            await asyncio.sleep(MEMORY_POLL)
        still, left = sum(now.get(pid, 0) for pid in held), len([pid for pid in held if pid in now])
        message = (
            f"memory on {device.id} did not come back within {MEMORY_WAIT:g}s: {left} "
            f"process(es) still hold {still / 2**20:.1f} MiB of the {sum(held.values()) / 2**20:.1f} MiB "
            f"they held (expected to free {figure / 2**20:.1f} MiB)"
        )
        logger.bind(model=name, device=device.id).warning("{}", message)
        self.events.publish(
            EventKind.MEMORY_WAIT,
            message,
            name,
            device=device.id,
            held=sum(held.values()),
            still_held=still,
            expected=figure,
            seconds=MEMORY_WAIT,
        )
