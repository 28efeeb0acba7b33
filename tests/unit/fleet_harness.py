"""A real Fleet driven in-process without Docker or a GPU, for the owner's unit tests.

``RecordingFakeRuntime`` stands in for ``DockerRuntime``: it records every call, and each
"container" it runs is a small aiohttp server on its UNIX socket answering ``/health`` (as
llama-server does once loaded), with made-up host PIDs. The Ollama server's container answers
instead the part of Ollama's API the fleet uses (``FakeOllamaApi``), with its state for tests to
read. ``FakeGpuSession`` stands in for the NVML session: readings and compute processes that a
test sets. The cgroup lookup maps those PIDs to the fake containers, as ``/proc/<pid>/cgroup`` would.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

from supervisor.config.profiles import Profile, load_profiles
from supervisor.config.settings import Config, ModelEntry, load_config, same_tag
from supervisor.core.backends import llamacpp, ollama, ollama_relay
from supervisor.core.containers import SOCKET_NAME, ContainerSpec, servers_dir
from supervisor.core.errors import DockerUnavailable, ModelStartFailed
from supervisor.core.estimate import LaunchSettings
from supervisor.core.placement import GpuReading
from supervisor.fleet.events import EventBus
from supervisor.fleet.owner import Fleet
from supervisor.fleet.sizing import Sizing, size_catalog
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


FAKE_CONTAINER_HEADER = "X-Fake-Container"  # each fake llama-server names its container in every answer


def _llama_server(name: str) -> web.Application:
    """A loaded llama-server, as far as the fleet and a test's requests look: ``/health`` answers 200, and
    ``/slow?seconds=S`` too, after S seconds (a long request)."""

    async def healthy(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, headers={FAKE_CONTAINER_HEADER: name})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("seconds", "0.5")))
        return await healthy(request)

    app = web.Application()
    app.router.add_get("/health", healthy)
    app.router.add_get("/slow", slow)
    return app


@dataclass
class FakeOllamaApi:
    """The part of Ollama's HTTP API the fleet uses (``supervisor/runtime/ollama_api.py``), over state a test reads.

    ``store``: the tags the server has (a pull adds one); ``embedding``: tags that only embed (``/api/show`` says
    so, and ``/api/generate`` refuses them, as Ollama does); ``loaded``: what ``/api/ps`` lists, by tag, with
    how it was loaded (``via``: generate or embed, ``num_ctx``). A new server container starts with nothing loaded.
    """

    store: set[str] = field(default_factory=set)
    embedding: set[str] = field(default_factory=set)
    size: int = 300 * 2**20  # what each loaded model uses (/api/ps's size; size_vram 0: on the CPU)
    loaded: dict[str, dict] = field(default_factory=dict)
    loads: Counter = field(default_factory=Counter)  # tag -> loads asked for (keep_alive -1)
    unloads: Counter = field(default_factory=Counter)  # tag -> unloads asked for (keep_alive 0)
    pulls: list[str] = field(default_factory=list)
    servers: int = 0  # server containers started

    def app(self) -> web.Application:
        self.servers += 1
        self.loaded.clear()  # a fresh server process
        app = web.Application()
        app.router.add_get("/api/version", self._version)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_get("/api/ps", self._ps)
        app.router.add_post("/api/show", self._show)
        app.router.add_post("/api/pull", self._pull)
        app.router.add_post("/api/generate", self._generate)
        app.router.add_post("/api/embed", self._embed)
        return app

    def _known(self, tag: str) -> str | None:
        return next((t for t in self.store if same_tag(t, tag)), None)

    def _is_loaded(self, tag: str) -> str | None:
        return next((t for t in self.loaded if same_tag(t, tag)), None)

    @staticmethod
    def _not_found(tag: str) -> web.Response:
        return web.json_response({"error": f"model '{tag}' not found"}, status=404)

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.0.0-fake"})

    async def _tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": t, "model": t} for t in sorted(self.store)]})

    async def _ps(self, request: web.Request) -> web.Response:
        return web.json_response({"models": list(self.loaded.values())})

    async def _show(self, request: web.Request) -> web.Response:
        tag = self._known((await request.json())["model"])
        if tag is None:
            return self._not_found((await request.json())["model"])
        capabilities = ["embedding"] if tag in self.embedding else ["completion"]
        return web.json_response({"details": {}, "model_info": {}, "parameters": "", "capabilities": capabilities})

    async def _pull(self, request: web.Request) -> web.StreamResponse:
        tag = (await request.json())["model"]
        self.pulls.append(tag)
        self.store.add(tag)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for line in (
            {"status": "pulling manifest"},
            {"status": "pulling 0123", "total": 10, "completed": 10},
            {"status": "success"},
        ):
            await response.write(json.dumps(line).encode() + b"\n")
        await response.write_eof()
        return response

    async def _generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        tag = self._known(body["model"])
        if tag is None:
            return self._not_found(body["model"])
        if body.get("keep_alive") == 0:
            self.unloads[tag] += 1
            self.loaded.pop(self._is_loaded(tag) or tag, None)
            return web.json_response({"model": tag, "response": "", "done": True, "done_reason": "unload"})
        if tag in self.embedding:
            return web.json_response({"error": f'"{tag}" does not support generate'}, status=400)
        self._load(tag, body, "generate")
        return web.json_response({"model": tag, "response": "", "done": True, "done_reason": "load"})

    async def _embed(self, request: web.Request) -> web.Response:
        body = await request.json()
        tag = self._known(body["model"])
        if tag is None:
            return self._not_found(body["model"])
        self._load(tag, body, "embed")
        return web.json_response({"model": tag, "embeddings": []})

    def _load(self, tag: str, body: dict, via: str) -> None:
        self.loads[tag] += 1
        self.loaded[tag] = {
            "name": tag,
            "model": tag,
            "size": self.size,
            "size_vram": 0,
            "via": via,
            "num_ctx": (body.get("options") or {}).get("num_ctx"),
        }


@dataclass
class RecordingFakeRuntime:
    """Records every call; its containers are HTTP servers on their sockets: a llama-server answers /health with
    200, the Ollama server answers as ``ollama`` (a ``FakeOllamaApi``) does."""

    calls: list[tuple] = field(default_factory=list)
    containers: dict[str, FakeContainer] = field(default_factory=dict)
    failing: set[str] = field(default_factory=set)  # models whose server exits at once (exit 1, "boom")
    fails: Callable[[ContainerSpec], bool] | None = None  # also exits at once: each spec this says so of
    start_delay: float = 0.0  # seconds the engine takes to create a container
    unremovable: set[str] = field(default_factory=set)  # container ids whose removal fails (the engine is away)
    ollama: FakeOllamaApi = field(default_factory=FakeOllamaApi)
    specs: dict[str, ContainerSpec] = field(default_factory=dict)  # container id -> the spec it was run with

    async def run(self, spec) -> ContainerInfo:
        """Create (listed at once, as ``created``), wait ``start_delay``, then start, as the engine does."""
        self.calls.append(("run", spec.name))
        created = ContainerInfo(secrets.token_hex(32), spec.name, "created", None, False, spec.labels())
        runner = web.AppRunner(web.Application())
        await runner.setup()
        self.containers[created.id], self.specs[created.id] = FakeContainer(created, [], runner), spec
        await asyncio.sleep(self.start_delay)
        if self.containers.pop(created.id, None) is None:
            raise ModelStartFailed(spec.model, f"its container {created.id[:12]} was removed while it was created")
        if spec.model in self.failing or (self.fails is not None and self.fails(spec)):
            info = replace(created, status="exited", exit_code=1)
            self.containers[info.id] = FakeContainer(info, [], runner)
            return info
        await runner.cleanup()
        app = self.ollama.app() if spec.model == ollama.SERVER_LABEL else _llama_server(spec.name)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.UnixSite(runner, socket_path(spec)).start()
        info = replace(created, status="running")
        self.containers[info.id] = FakeContainer(info, [next(_pids)], runner)
        return info

    async def inspect(self, container_id: str) -> ContainerInfo | None:
        self.calls.append(("inspect", container_id))
        container = self.containers.get(container_id)
        return container.info if container else None

    async def stop_and_remove(self, container_id: str, grace: float) -> None:
        self.calls.append(("stop_and_remove", container_id))
        if container_id in self.unremovable:
            raise DockerUnavailable(f"Docker engine not reachable (stop container {container_id[:12]})")
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

    def id_of(self, name: str) -> str:
        """The id of the container run as ``name``."""
        return next(cid for cid, spec in self.specs.items() if spec.name == name)

    def timeline(self) -> list[tuple[str, str]]:
        """("run" | "remove", container name) in the order the engine was asked."""
        names = {cid: spec.name for cid, spec in self.specs.items()}
        return [
            ("run", arg) if call == "run" else ("remove", names.get(arg, arg))
            for call, arg, *_ in self.calls
            if call in ("run", "stop_and_remove")
        ]

    async def exit(self, container_id: str, code: int = 137) -> None:
        """The container's server dies: it exits, and its socket goes with it."""
        container = self.containers[container_id]
        container.info = replace(container.info, status="exited", exit_code=code)
        await container.runner.cleanup()

    def running(self, model: str) -> list[str]:
        return [
            cid
            for cid, c in self.containers.items()
            if c.info.labels.get("io.localllm.model") == model and c.info.running
        ]


def socket_path(spec) -> str:
    """Where the server of ``spec`` listens: the socket in the directory mounted for it (Ollama's: its relay's)."""
    mount = next(m for m in spec.mounts if m.target in (llamacpp.SOCKET_DIR, ollama_relay.SOCKET_DIR))
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


async def until(condition, timeout: float = 5.0, what: str = "the condition") -> None:
    """Wait until ``condition()`` holds, failing the test after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def kinds(bus: EventBus) -> list[str]:
    """The kinds of the events published so far, in order."""
    return [event.kind for event in bus.recent()]


def cpu_fleet(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    needs: dict[str, int],
    runtime: RecordingFakeRuntime | None = None,
    models: dict[str, dict] | None = None,
    **daemon,
) -> tuple[Fleet, RecordingFakeRuntime, EventBus]:
    """A fleet of llama.cpp models (``needs``: name -> bytes) on the CPU profile, with the recording fake.

    ``models`` adds catalog settings per model (preload, context_size...); ``daemon`` the daemon's."""
    runtime = runtime or RecordingFakeRuntime()
    entries = []
    for name in needs:
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(b"GGUF")
        entries.append(ModelEntry(name=name, gguf=path, ttl=0, **(models or {}).get(name, {})))
    settings = {
        "instance": "unit",
        "state_dir": str(tmp_path),
        "stop_grace": 0,
        "min_residency": 0,
        "startup_timeout": 5,
        **daemon,
    }
    config = Config(profile=CPU, models=entries, daemon=settings)
    launch = LaunchSettings(context=4096)
    sizings = {n: Sizing(launch, None, None, None, "test", need) for n, need in needs.items()}
    bus = EventBus()
    fleet = Fleet(config, load_profiles()[CPU], runtime, session, sizings, None, None, bus)
    return fleet, runtime, bus


def gpu_fleet(
    tmp_path: Path,
    profile: Profile,
    session: aiohttp.ClientSession,
    gpus: FakeGpuSession,
    needs: dict[str, int],
    learned: LearnedSizes | None = None,
    runtime: RecordingFakeRuntime | None = None,
) -> tuple[Fleet, RecordingFakeRuntime, EventBus]:
    """A fleet of llama.cpp models (``needs``: name -> bytes) on a GPU profile, with the fakes above."""
    runtime = runtime or RecordingFakeRuntime()
    models = []
    for name in needs:
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(b"GGUF")
        models.append(ModelEntry(name=name, gguf=path, ttl=0))
    config = Config(
        profile=profile.name,
        models=models,
        daemon={
            "instance": "unit",
            "state_dir": str(tmp_path),
            "stop_grace": 0,
            "min_residency": 0,
            "startup_timeout": 5,
        },
    )
    launch = LaunchSettings(context=4096, on_gpu=True)
    sizings = {n: Sizing(launch, None, None, f"key-{n}", "test", need) for n, need in needs.items()}
    bus = EventBus()
    watch = GpuWatch(gpus, runtime.container_of)
    fleet = Fleet(config, profile, runtime, session, sizings, learned, gpus.read(), bus, watch)
    return fleet, runtime, bus


def config_text(tmp_path: Path, models: list[dict], **sections) -> str:
    """A config file's text on the CPU profile with the unit daemon settings: ``models`` (a llama.cpp one gets a
    ``gguf`` file of its own), and other top-level ``sections`` (``ollama``...)."""
    entries = []
    for model in models:
        if model.get("backend", "llamacpp") == "llamacpp" and "gguf" not in model:
            path = tmp_path / f"{model['name']}.gguf"
            path.write_bytes(b"GGUF")
            model = {"gguf": str(path), **model}
        entries.append({"ttl": 0, **model})
    daemon = {"instance": "unit", "state_dir": str(tmp_path), "stop_grace": 0, "min_residency": 0, "startup_timeout": 5}
    return yaml.safe_dump({"profile": CPU, "daemon": daemon, **sections, "models": entries}, sort_keys=False)


def text_fleet(
    tmp_path: Path, session: aiohttp.ClientSession, text: str, runtime: RecordingFakeRuntime | None = None
) -> tuple[Fleet, RecordingFakeRuntime, EventBus, Path]:
    """A fleet started as the daemon starts one from the config file ``text`` (saved as ``config.yaml``), sized
    as the daemon sizes it; a rollout may apply other texts of the same file to it."""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    config = load_config(path)
    profile = load_profiles()[config.profile]
    runtime = runtime or RecordingFakeRuntime()
    bus = EventBus()
    fleet = Fleet(config, profile, runtime, session, size_catalog(config, profile, None), None, None, bus)
    return fleet, runtime, bus, path
