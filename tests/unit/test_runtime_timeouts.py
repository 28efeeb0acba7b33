"""The deadlines on the Docker engine and the Ollama server (``daemon.timeouts.docker``, ``.ollama``), each shown to
fire, and when, against an in-process stand-in that stalls: a Docker API socket that takes connections and never
answers (or answers some calls only), an Ollama server that never answers a quick call. The calls that wait on a
model's load keep their own patience. Times must fall within the setting plus ``MARGIN``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from supervisor.config.profiles import load_profiles
from supervisor.config.settings import DaemonSettings, ModelEntry, Timeouts
from supervisor.core.backends import llamacpp
from supervisor.core.containers import Endpoint, servers_dir
from supervisor.core.errors import DockerFailure, ModelStartFailed, OllamaFailure
from supervisor.runtime.docker_runtime import DockerRuntime
from supervisor.runtime.ollama_api import OllamaApi
from supervisor.runtime.upstream import open_session

SETTING = 0.5  # seconds: every deadline under test
LONG = 30.0
MARGIN = 0.4  # seconds a deadline may fire late on a loaded test machine


def within(took: float, setting: float = SETTING) -> bool:
    print(f"fired after {took:.3f}s (setting {setting:g}s)")
    return setting <= took < setting + MARGIN


async def until_closed(request: web.Request) -> web.Response:
    """Answer nothing while the caller holds the connection."""
    while request.transport is not None and not request.transport.is_closing():
        await asyncio.sleep(0.01)
    return web.Response()


async def timed(call) -> tuple[BaseException, float]:
    started = time.monotonic()
    with pytest.raises(Exception) as caught:
        await call
    return caught.value, time.monotonic() - started


# -- Docker -------------------------------------------------------------------------------------------------------


def test_an_engine_that_takes_the_connection_and_never_answers_fails_connect_within_the_setting(tmp_path):
    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX) as silent:
        silent.bind(str(path))
        silent.listen(64)  # the kernel takes connections; nobody reads them: a hung dockerd

        async def scenario():
            runtime = DockerRuntime(f"unix://{path}", timeout=SETTING)
            try:
                return await timed(runtime.connect())
            finally:
                await runtime.close()

        error, took = asyncio.run(scenario())
    assert isinstance(error, DockerFailure), error
    # the thread's deadline or the SDK's own read timeout, the same setting: whichever ends the wait first
    assert (
        error.message.startswith("Docker did not answer in time to connect (")
        and "daemon.timeouts.docker" in error.message
    )
    assert within(took)


@dataclass
class FakeEngine:
    """The Docker API as far as the calls below go: ``/version`` answers; a path containing one of ``stalls`` is never
    answered; a container is created in ``create_delay`` and started in ``start_delay`` seconds."""

    stalls: tuple[str, ...] = ()
    create_delay: float = 0.0
    start_delay: float = 0.0
    deleted: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path.split("/", 2)[-1] if request.path.startswith("/v1.") else request.path.lstrip("/")
        if path == "version":
            return web.json_response({"Version": "fake", "ApiVersion": "1.45", "MinAPIVersion": "1.24"})
        if any(stall in path for stall in self.stalls):
            return await until_closed(request)
        if path.startswith("images/"):
            return web.json_response({"Id": "sha256:fake"})
        if path == "containers/create":
            await asyncio.sleep(self.create_delay)
            return web.json_response({"Id": "c0ffee"}, status=201)
        if path.endswith("/start"):
            await asyncio.sleep(self.start_delay)
            return web.Response(status=204)
        if path.endswith("/stop"):
            return web.Response(status=204)
        if request.method == "DELETE":
            self.deleted.append(path.split("/")[1])
            return web.Response(status=204)
        if path.endswith("/json"):
            state = {"Status": "running", "Running": True}
            return web.json_response({"Id": "c0ffee", "Name": "/x", "State": state, "Config": {"Labels": {}}})
        return web.json_response({"message": f"no {path}"}, status=404)


def with_engine(tmp_path, engine: FakeEngine, test) -> None:
    """``test(runtime)`` with a connected DockerRuntime (deadline SETTING) on ``engine``'s socket."""

    async def scenario():
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", engine.handle)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        await web.UnixSite(runner, str(tmp_path / "docker.sock")).start()
        runtime = DockerRuntime(f"unix://{tmp_path / 'docker.sock'}", timeout=SETTING)
        try:
            await runtime.connect()
            await test(runtime)
        finally:
            await runtime.close()
            await runner.cleanup()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "call, stall, what",
    [
        (lambda runtime: runtime.inspect("c0ffee"), "containers/c0ffee/json", "inspect container c0ffee"),
        (lambda runtime: runtime.ping(), "_ping", "ping the engine"),
        (lambda runtime: runtime.list_labelled({"a": "b"}), "containers/json", "list containers"),
        (lambda runtime: runtime.logs_tail("c0ffee"), "logs", "read logs of c0ffee"),
        (lambda runtime: runtime.logs_stream("c0ffee", 10, True).__anext__(), "logs", "read logs of c0ffee"),
        (lambda runtime: runtime.remove_networks("unit"), "networks", "remove the networks of unit"),
    ],
    ids=["inspect", "ping", "list", "logs", "logs-follow-opening", "networks"],
)
def test_each_docker_call_the_engine_never_answers_fails_within_the_setting(tmp_path, call, stall, what):
    async def test(runtime):
        error, took = await timed(call(runtime))
        assert isinstance(error, DockerFailure), error
        # the deadline around the call, or the SDK's on its request: the same setting, whichever comes first
        assert (
            error.message.startswith(f"Docker did not answer in time to {what} (")
            and "timeouts.docker" in error.message
        )
        assert within(took)

    with_engine(tmp_path, FakeEngine(stalls=(stall,)), test)


def test_a_stop_gets_its_grace_on_top_of_the_setting(tmp_path):
    async def test(runtime):
        error, took = await timed(runtime.stop_and_remove("c0ffee", grace=1))
        assert isinstance(error, DockerFailure) and "stop container c0ffee" in error.message, error
        assert within(took, SETTING + 1)

    with_engine(tmp_path, FakeEngine(stalls=("/stop",)), test)


def test_a_start_past_its_deadline_fails_and_what_the_engine_made_meanwhile_is_removed(tmp_path):
    """Each request within the SDK's timeout, the two together past the deadline: the container the engine makes
    after the start has failed is removed, as nothing else would know it."""
    engine = FakeEngine(create_delay=0.3, start_delay=0.3)
    entry = ModelEntry(name="tiny", gguf=tmp_path / "tiny.gguf")
    spec = llamacpp.container_spec(entry, load_profiles()["cpu-only"], DaemonSettings(), Endpoint(socket="0123abcd"))

    async def test(runtime):
        error, took = await timed(runtime.run(spec))
        assert isinstance(error, DockerFailure) and f"start container {spec.name}" in error.message, error
        assert within(took)
        for _ in range(100):
            if engine.deleted:
                break
            await asyncio.sleep(0.02)
        assert engine.deleted == ["c0ffee"]

    with_engine(tmp_path, engine, test)


# -- Ollama -------------------------------------------------------------------------------------------------------


def with_ollama(tmp_path, handlers: dict, test, **chosen: float) -> None:
    """``test(api)``: an OllamaApi on the daemon's kind of session, opened with ``chosen`` timeouts, in front of an
    Ollama stand-in that answers each path with its handler."""

    async def handle(request: web.Request) -> web.StreamResponse:
        return await handlers[request.path](request)

    async def scenario():
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", handle)
        limits = Timeouts(**{"upstream_connect": LONG, "ollama": LONG, **chosen})
        async with TestServer(app, host="127.0.0.1") as server, open_session(servers_dir(tmp_path), limits) as session:
            await test(OllamaApi(session, str(server.make_url("")).rstrip("/"), "m"))  # its timeouts: the session's

    asyncio.run(scenario())


def after(seconds: float, body: dict):
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(seconds)
        return web.json_response(body)

    return handler


@pytest.mark.parametrize(
    "call, path",
    [(lambda api: api.has("tiny:1b"), "/api/tags"), (lambda api: api.show("tiny:1b"), "/api/show")],
    ids=["tags", "show"],
)
def test_a_quick_ollama_call_that_is_never_answered_fails_within_the_setting(tmp_path, call, path):
    async def test(api):
        error, took = await timed(call(api))
        assert isinstance(error, OllamaFailure) and f"Ollama {path} did not answer" in error.message, error
        assert within(took)

    with_ollama(tmp_path, {path: until_closed}, test, ollama=SETTING)


def test_the_calls_that_wait_on_a_load_keep_their_patience(tmp_path):
    """A load, and /api/ps (which Ollama holds during any load), may take longer than the setting."""
    handlers = {"/api/generate": after(1.0, {"done": True}), "/api/ps": after(1.0, {"models": []})}

    async def test(api):
        await api.load("tiny:1b", 4096)
        assert await api.loaded(timeout=5) == {}
        assert await api.wait_gone("tiny:1b", timeout=5)

    with_ollama(tmp_path, handlers, test, ollama=SETTING)


def test_an_ollama_server_that_takes_no_connection_fails_within_upstream_connect(tmp_path):
    """A TCP port whose listener's queue is full: the kernel drops the SYN, and connect() waits."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port))

    async def scenario():
        limits = Timeouts(upstream_connect=SETTING, ollama=LONG)
        async with open_session(servers_dir(tmp_path), limits) as session:
            api = OllamaApi(session, f"http://127.0.0.1:{port}", "m")
            tags = await timed(api.has("tiny:1b"))
            load = await timed(api.load("tiny:1b", 4096))  # a load waits long for its answer, not to connect
            return tags, load

    try:
        (tags, took_tags), (load, took_load) = asyncio.run(scenario())
    finally:
        queued.close()
        listener.close()
    assert isinstance(tags, OllamaFailure) and "/api/tags did not answer" in tags.message, tags
    assert isinstance(load, ModelStartFailed), load
    assert within(took_tags) and within(took_load)
