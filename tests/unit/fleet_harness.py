"""A real Fleet driven in-process without Docker or a GPU, for the owner's unit tests.

``RecordingFakeRuntime`` stands in for ``DockerRuntime``: it records every call, and each
"container" it runs is a small aiohttp server on loopback answering ``/health`` (as
llama-server does once loaded), with made-up host PIDs. ``FakeGpuSession`` stands in for
the NVML session: readings and compute processes that a test sets. The cgroup lookup
maps those PIDs to the fake containers, as ``/proc/<pid>/cgroup`` would.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
from aiohttp import web

from supervisor.config.profiles import Profile
from supervisor.config.settings import Config, ModelEntry
from supervisor.core.backends import llamacpp
from supervisor.core.containers import SOCKET_NAME, servers_dir
from supervisor.core.estimate import LaunchSettings
from supervisor.core.placement import GpuReading
from supervisor.fleet.events import EventBus
from supervisor.fleet.owner import Fleet
from supervisor.fleet.sizing import Sizing
from supervisor.runtime.container_runtime import ContainerInfo
from supervisor.runtime.gpu_watch import GpuWatch
from supervisor.runtime.nvml import GpuProcess
from supervisor.runtime.upstream import open_session
from supervisor.state.learned import LearnedSizes

GIB = 1024**3
_pids = itertools.count(40_000)


@dataclass
class FakeContainer:
    info: ContainerInfo
    pids: list[int]
    runner: web.AppRunner


async def _healthy(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@dataclass
class RecordingFakeRuntime:
    """Records every call; its containers are HTTP servers on their sockets that answer /health with 200."""

    calls: list[tuple] = field(default_factory=list)
    containers: dict[str, FakeContainer] = field(default_factory=dict)
    failing: set[str] = field(default_factory=set)  # models whose server exits at once (exit 1, "boom")
    start_delay: float = 0.0  # seconds the engine takes to create a container

    async def run(self, spec) -> ContainerInfo:
        self.calls.append(("run", spec.name))
        await asyncio.sleep(self.start_delay)
        if spec.model in self.failing:
            info = ContainerInfo(secrets.token_hex(32), spec.name, "exited", 1, False, spec.labels())
            runner = web.AppRunner(web.Application())
            await runner.setup()
            self.containers[info.id] = FakeContainer(info, [], runner)
            return info
        app = web.Application()
        app.router.add_get("/health", _healthy)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.UnixSite(runner, socket_path(spec)).start()
        info = ContainerInfo(secrets.token_hex(32), spec.name, "running", None, False, spec.labels())
        self.containers[info.id] = FakeContainer(info, [next(_pids)], runner)
        return info

    async def inspect(self, container_id: str) -> ContainerInfo | None:
        self.calls.append(("inspect", container_id))
        container = self.containers.get(container_id)
        return container.info if container else None

    async def stop_and_remove(self, container_id: str, grace: float) -> None:
        self.calls.append(("stop_and_remove", container_id))
        container = self.containers.pop(container_id, None)
        if container is not None:
            await container.runner.cleanup()

    async def logs_tail(self, container_id: str, lines: int = 40) -> str:
        container = self.containers.get(container_id)
        return "boom" if container is not None and container.info.exited else ""

    async def logs_stream(self, container_id: str, tail: int, follow: bool) -> AsyncIterator[bytes]:
        self.calls.append(("logs_stream", container_id))
        yield b""

    async def list_labelled(self, labels: dict[str, str]) -> list[ContainerInfo]:
        return [c.info for c in self.containers.values()]

    async def ping(self) -> None:
        return None

    async def remove_networks(self, owner: str) -> None:
        self.calls.append(("remove_networks", owner))

    def container_of(self, pid: int) -> str | None:
        """What /proc/<pid>/cgroup would name."""
        return next((cid for cid, c in self.containers.items() if pid in c.pids), None)

    def removed(self) -> list[str]:
        return [cid for call, cid in self.calls if call == "stop_and_remove"]

    def started(self) -> list[str]:
        """The names of the containers run, in order."""
        return [name for call, name in self.calls if call == "run"]

    async def exit(self, container_id: str, code: int = 137) -> None:
        """The container's server dies: it exits, and its socket goes with it."""
        container = self.containers[container_id]
        container.info = replace(container.info, status="exited", exit_code=code)
        await container.runner.cleanup()

    def running(self, model: str) -> list[str]:
        return [cid for cid, c in self.containers.items() if c.info.labels.get("io.localllm.model") == model
                and c.info.running]


def socket_path(spec) -> str:
    """Where the server of ``spec`` listens: the socket in the directory mounted for it."""
    mount = next(m for m in spec.mounts if m.target == llamacpp.SOCKET_DIR)
    return str(Path(mount.source) / SOCKET_NAME)


@dataclass
class FakeGpuSession:
    """The NVML session's interface (read, processes, close) with what a test sets."""

    readings: list[GpuReading]
    procs: list[GpuProcess] = field(default_factory=list)

    def read(self) -> list[GpuReading]:
        return list(self.readings)

    def processes(self) -> list[GpuProcess]:
        return list(self.procs)

    def close(self) -> None:
        pass

    def put(self, pid: int, used: int, gpu_index: int = 0) -> None:
        """Process ``pid`` now uses ``used`` bytes on the GPU (replacing what it used before)."""
        self.procs = [p for p in self.procs if p.pid != pid] + [GpuProcess(pid, used, gpu_index, f"GPU-{gpu_index}")]

    def drop(self, pid: int) -> None:
        self.procs = [p for p in self.procs if p.pid != pid]


def gpu_reading(index: int, total: int = 24 * GIB, free: int | None = None, problem: str | None = None) -> GpuReading:
    if problem:
        return GpuReading(index, "fake", 0, 0, 0, uuid=f"GPU-{index}", problem=problem)
    free = total if free is None else free
    return GpuReading(index, "fake", total, total - free, free, uuid=f"GPU-{index}")


CPU = "cpu-only"


def scenario(body, state_dir: Path):
    """Run ``body(session)`` on a fresh loop with the daemon's kind of session (sockets under ``state_dir``)."""
    async def run():
        async with open_session(servers_dir(state_dir)) as session:
            return await body(session)
    return asyncio.run(run())


def kinds(bus: EventBus) -> list[str]:
    """The kinds of the events published so far, in order."""
    return [event.kind for event in bus.recent()]


def cpu_fleet(tmp_path: Path, session: aiohttp.ClientSession, needs: dict[str, int],
              runtime: RecordingFakeRuntime | None = None, models: dict[str, dict] | None = None,
              **daemon) -> tuple[Fleet, RecordingFakeRuntime, EventBus]:
    """A fleet of llama.cpp models (``needs``: name -> bytes) on the CPU profile, with the recording fake.

    ``models`` adds catalog settings per model (preload, context_size...); ``daemon`` the daemon's."""
    from supervisor.config.profiles import load_profiles

    runtime = runtime or RecordingFakeRuntime()
    entries = []
    for name in needs:
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(b"GGUF")
        entries.append(ModelEntry(name=name, gguf=path, ttl=0, **(models or {}).get(name, {})))
    settings = {"instance": "unit", "state_dir": str(tmp_path), "stop_grace": 0, "min_residency": 0,
                "startup_timeout": 5, **daemon}
    config = Config(profile=CPU, models=entries, daemon=settings)
    launch = LaunchSettings(context=4096)
    sizings = {n: Sizing(launch, None, None, None, "test", need) for n, need in needs.items()}
    bus = EventBus()
    fleet = Fleet(config, load_profiles()[CPU], runtime, session, sizings, None, None, bus)
    return fleet, runtime, bus


def gpu_fleet(tmp_path: Path, profile: Profile, session: aiohttp.ClientSession, gpus: FakeGpuSession,
              needs: dict[str, int], learned: LearnedSizes | None = None,
              runtime: RecordingFakeRuntime | None = None) -> tuple[Fleet, RecordingFakeRuntime, EventBus]:
    """A fleet of llama.cpp models (``needs``: name -> bytes) on a GPU profile, with the fakes above."""
    runtime = runtime or RecordingFakeRuntime()
    models = []
    for name in needs:
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(b"GGUF")
        models.append(ModelEntry(name=name, gguf=path, ttl=0))
    config = Config(profile=profile.name, models=models,
                    daemon={"instance": "unit", "state_dir": str(tmp_path),
                            "stop_grace": 0, "min_residency": 0, "startup_timeout": 5})
    launch = LaunchSettings(context=4096, on_gpu=True)
    sizings = {n: Sizing(launch, None, None, f"key-{n}", "test", need) for n, need in needs.items()}
    bus = EventBus()
    watch = GpuWatch(gpus, runtime.container_of)
    fleet = Fleet(config, profile, runtime, session, sizings, learned, gpus.read(), bus, watch)
    return fleet, runtime, bus
