"""Fixtures for tests on the real Docker engine with the real llama-server image.

Every container a test creates carries the label ``io.localllm.test-run`` with
this run's id; teardown removes whatever carries it, so a failed test leaves
nothing behind. The engine and the image must be present (``bash
scripts/dev.sh test`` sets them up); if not, the tests fail and say how.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import docker
import pytest
import requests
import yaml

from supervisor.core.containers import LABEL_OWNER, Endpoint, servers_dir
from supervisor.runtime.images import cpu_image_tag
from supervisor.runtime.tinygguf import write_tiny_model
from supervisor.runtime.upstream import make_socket_dir, open_session, server_user

RUN_ID = uuid.uuid4().hex[:8]
INSTANCE_NUMBERS = itertools.count()  # every daemon of the run gets its own instance name
TEST_RUN_LABEL = "io.localllm.test-run"


def pytest_collection_modifyitems(items) -> None:
    """The engine-restart test goes last, whatever the selection order."""
    items.sort(key=lambda item: "engine_restart" in item.nodeid)


def poll_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Return the first truthy value of ``condition()``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def socket_endpoint(state_dir: Path, user: tuple[int, int] | None = None) -> Endpoint:
    """A socket endpoint with its private directory under ``state_dir`` for a server running as ``user``
    (default: llama-server's), as the daemon makes one."""
    endpoint = Endpoint(socket=secrets.token_hex(8))
    make_socket_dir(servers_dir(state_dir), endpoint, user or server_user())
    return endpoint


@pytest.fixture(scope="session")
def server_state(tmp_path_factory) -> Path:
    """A state directory short enough for sockets, for servers a test runs without the daemon."""
    return tmp_path_factory.mktemp("st")


def executable(name: str) -> str:
    """A console script of the interpreter running the tests."""
    return str(Path(sys.executable).parent / name)


@pytest.fixture(scope="session")
def engine() -> docker.DockerClient:
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"no Docker engine: {exc}; run the tests with `bash scripts/dev.sh test`")
    try:
        client.images.get(cpu_image_tag())
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {cpu_image_tag()} missing; run `localllmctl image build` or `bash scripts/dev.sh test`")
    yield client
    for container in client.containers.list(
        all=True, filters={"label": f"{TEST_RUN_LABEL}={RUN_ID}"}, ignore_removed=True
    ):
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
    for network in client.networks.list(filters={"label": f"{TEST_RUN_LABEL}={RUN_ID}"}):
        with contextlib.suppress(docker.errors.APIError):
            network.remove()
    client.close()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """Generated models: two healthy ones and one that llama-server cannot load."""
    directory = tmp_path_factory.mktemp("models")
    write_tiny_model(directory / "tiny.gguf", seed=1, name="tiny")
    write_tiny_model(directory / "tiny2.gguf", seed=2, name="tiny2")
    write_tiny_model(directory / "tiny3.gguf", seed=3, name="tiny3")
    write_tiny_model(directory / "coder.gguf", seed=7, name="coder", fim=True)  # serves /infill
    # Slow enough to observe streaming: a few ms per token on a CPU.
    write_tiny_model(directory / "slow.gguf", embedding=384, blocks=6, heads=6, kv_heads=2, name="slow")
    write_tiny_model(directory / "slow2.gguf", embedding=384, blocks=6, heads=6, kv_heads=2, seed=5, name="slow2")
    (directory / "broken.gguf").write_bytes(b"GGUF" + b"\x00" * 60 + b"not a model")
    return directory


@dataclass
class DaemonProcess:
    """A real ``localllmd`` subprocess with its config, proxy URL and control socket."""

    config_path: Path
    instance: str
    proxy_url: str
    socket: Path
    process: subprocess.Popen
    log_path: Path
    config: dict = field(default_factory=dict)

    def status(self) -> dict:
        done = subprocess.run(
            [executable("localllmctl"), "--socket", str(self.socket), "status", "--json"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def try_status(self) -> dict | None:
        try:
            return self.status()
        except AssertionError:
            return None

    def model(self, name: str) -> dict:
        return next(m for m in self.status()["models"] if m["name"] == name)

    def wait_state(self, name: str, *states: str, timeout: float = 60) -> dict:
        return poll_for(lambda: (m := self.model(name))["state"] in states and m, timeout, f"{name} in {states}")

    def chat(self, model: str, **extra) -> requests.Response:
        body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], **extra}
        return requests.post(f"{self.proxy_url}/chat/completions", json=body, timeout=120)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


@pytest.fixture
def start_daemon(engine, models_dir, tmp_path):
    """Factory: write a config for the given models and start localllmd on it; waits for the control API."""
    with daemon_factory(engine, models_dir, tmp_path) as start:
        yield start


@pytest.fixture(scope="module")
def start_module_daemon(engine, models_dir, tmp_path_factory):
    """As ``start_daemon``, for a daemon that a module's tests share: stopped when the module is done."""
    with daemon_factory(engine, models_dir, tmp_path_factory.mktemp("module")) as start:
        yield start


@contextlib.contextmanager
def daemon_factory(engine, models_dir: Path, tmp_path: Path):
    started: list[DaemonProcess] = []

    def start(
        models: list[dict], wait_ready: bool = True, top: dict | None = None, env: dict | None = None, **daemon_settings
    ) -> DaemonProcess:
        instance = daemon_settings.pop("instance", f"t{RUN_ID}-{next(INSTANCE_NUMBERS)}")
        proxy_port = free_tcp_port()
        # per instance: a daemon started again as the same instance finds its state (and its sockets) again
        state_dir = Path(daemon_settings.pop("state_dir", tmp_path / instance))
        config = {
            "profile": "cpu-only",
            "daemon": {
                "instance": instance,
                "proxy_listen": f"127.0.0.1:{proxy_port}",
                "state_dir": str(state_dir),
                "labels": {TEST_RUN_LABEL: RUN_ID},
                "startup_timeout": 30,
                "stop_grace": 5,
                "log_level": "DEBUG",
                **daemon_settings,
            },
            "models": [
                m if m.get("backend") == "ollama" else {"context_size": 256, **m, "gguf": str(models_dir / m["gguf"])}
                for m in models
            ],
            **(top or {}),
        }
        config_path = tmp_path / f"{instance}-{len(started)}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        log_path = tmp_path / f"{instance}-{len(started)}.log"
        with log_path.open("w") as log_file:
            process = subprocess.Popen(
                [executable("localllmd"), "--config", str(config_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        daemon = DaemonProcess(
            config_path,
            instance,
            f"http://127.0.0.1:{proxy_port}/v1",
            state_dir / "control.sock",
            process,
            log_path,
            config,
        )
        started.append(daemon)
        poll_for(lambda: process.poll() is not None or daemon.try_status(), 30, "the control API")
        assert process.poll() is None, f"localllmd exited early:\n{daemon.log()}"
        if wait_ready:
            for m in models:
                if m.get("preload"):
                    daemon.wait_state(m["name"], "ready", "failed")
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.send_signal(signal.SIGTERM)
            try:
                daemon.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.process.kill()
        for container in our_containers(engine, daemon.instance):
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
        for network in engine.networks.list(filters={"label": f"{LABEL_OWNER}={daemon.instance}"}):
            with contextlib.suppress(docker.errors.APIError):  # the engine holds at most ~30 bridge networks
                network.remove()


def ask_server(
    engine: docker.DockerClient, daemon: DaemonProcess, model: str, path: str, body: dict | None = None
) -> bytes:
    """``GET path`` (``POST`` with a JSON ``body``) of ``model``'s own server, on its socket, the way only the
    daemon can reach it: the raw answer, which must be 200."""
    [container] = [c for c in our_containers(engine, daemon.instance) if c.labels["io.localllm.model"] == model]
    endpoint = Endpoint.from_label(container.labels["io.localllm.endpoint"])

    async def call():
        async with open_session(servers_dir(Path(daemon.config["daemon"]["state_dir"]))) as session:
            limit = aiohttp.ClientTimeout(total=60)
            request = (
                session.post(endpoint.url + path, json=body, timeout=limit)
                if body is not None
                else session.get(endpoint.url + path, timeout=limit)
            )
            async with request as answer:
                raw = await answer.read()
                assert answer.status == 200, raw
                return raw

    return asyncio.run(call())


def long_stream(model: str, max_tokens: int) -> dict:
    """A streaming chat that generates ``max_tokens`` tokens whatever the model says (``ignore_eos``): it stays in
    flight while a test does something to its model."""
    return {
        "model": model,
        "stream": True,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": "count"}],
    }


def our_containers(engine: docker.DockerClient, instance: str) -> list:
    return engine.containers.list(all=True, filters={"label": f"{LABEL_OWNER}={instance}"}, ignore_removed=True)


def assert_invariants(daemon: DaemonProcess, engine: docker.DockerClient) -> None:
    """After a fault: one running container per ready model, carrying the spec's config hash, and nothing else;
    the last-good generation is good; no temp files in the state directory."""
    status = daemon.status()
    containers = our_containers(engine, daemon.instance)
    servers = [c for c in containers if c.labels["io.localllm.model"] == "_ollama"]  # Ollama's: one for its models
    containers = [c for c in containers if c not in servers]
    ready = {m["name"]: m for m in status["models"] if m["state"] == "ready" and m["backend"] != "ollama"}
    assert sorted(c.labels["io.localllm.model"] for c in containers) == sorted(ready), "one container per model"
    for container in containers:
        model = ready[container.labels["io.localllm.model"]]
        assert container.status == "running" and container.id.startswith(model["container"])
        assert container.labels["io.localllm.config-hash"] == model["config_hash"]
    assert len(servers) <= 1, "one Ollama server at most"
    for model in status["models"]:
        if model["backend"] == "ollama" and model["state"] == "ready":
            assert servers and servers[0].status == "running" and servers[0].id.startswith(model["container"])
    generations = json.loads(
        subprocess.run(
            [executable("localllmctl"), "--socket", str(daemon.socket), "history", "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert all(g["status"] == "good" for g in generations if g["last_good"])
    assert not list(daemon.socket.parent.rglob("*.tmp")), "temp files left behind"
