"""Containers at least privilege, on the real engine: what ``docker inspect`` shows, and that they still serve.

Every container localllm runs has no capabilities, cannot gain privileges, has a read-only root
filesystem with a tmpfs /tmp, and a pids limit; llama-server runs as nobody (65534:65534), with a RAM
limit when it is given its need; Ollama's server (the STAND-IN here) runs as the owner of its store.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from supervisor.config.profiles import load_profiles
from supervisor.config.settings import Config, DaemonSettings, ModelEntry
from supervisor.core.backends import llamacpp, ollama
from supervisor.core.containers import memory_limit_for, servers_dir
from supervisor.runtime.docker_runtime import DockerRuntime
from supervisor.runtime.health import wait_until_ready
from supervisor.runtime.upstream import open_session, server_user

from .conftest import RUN_ID, TEST_RUN_LABEL, our_containers, socket_endpoint
from .ollama_standin import ensure_standin_image

CPU = load_profiles()["cpu-only"]
REGISTRY = {"tiny-a:1b": {"size": 200_000_000, "parameter_size": "1.1B", "quantization_level": "Q4_0"}}


def host_config(engine, container) -> tuple[dict, dict]:
    inspected = engine.api.inspect_container(container.id if hasattr(container, "id") else container)
    return inspected["HostConfig"], inspected["Config"]


async def while_ready(spec, health_url: str, body, servers: Path | None = None):
    """Run ``spec`` without the daemon, wait for ``health_url``, return ``await body(info)``, then remove it.

    ``servers``: the directory of socket directories, for a server on a socket."""
    runtime = DockerRuntime()
    await runtime.connect()
    info = await runtime.run(spec)
    try:
        async with open_session(servers or Path("/nonexistent")) as session:
            await wait_until_ready(
                runtime, session, model=spec.model, container_id=info.id, url=health_url, deadline=30
            )
        return await body(info)
    finally:
        await runtime.stop_and_remove(info.id, 0)
        await runtime.close()


def assert_confined(host: dict) -> None:
    assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd")
    assert any(opt in ("no-new-privileges", "no-new-privileges:true") for opt in host["SecurityOpt"] or [])
    assert host["ReadonlyRootfs"] is True
    assert host["PidsLimit"] and host["PidsLimit"] > 0
    assert "/tmp" in (host.get("Tmpfs") or {})
    assert not host["Privileged"]


def test_a_llamacpp_container_is_confined_and_still_serves(start_daemon, engine):
    daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf", "preload": True}])
    assert daemon.model("tiny")["state"] == "ready", daemon.model("tiny")["error"]
    [container] = our_containers(engine, daemon.instance)
    host, config = host_config(engine, container)
    assert_confined(host)
    assert host["PidsLimit"] == llamacpp.PIDS_LIMIT
    assert config["User"] == "65534:65534"  # not root (the tests' daemon is root: its servers run as nobody)
    assert host["NetworkMode"] == "none"
    need = daemon.model("tiny")["memory"]["estimate"]["total"]  # a CPU profile: limited to its estimated need
    assert host["Memory"] == host["MemorySwap"] == memory_limit_for(need)
    answer = daemon.chat("tiny")
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] is not None


def test_a_llamacpp_container_gets_the_memory_limit_of_its_need(engine, models_dir, server_state):
    need = 128 << 20
    entry = ModelEntry(name="tiny", gguf=models_dir / "tiny.gguf", context_size=256)
    settings = DaemonSettings(instance=f"hd{RUN_ID}", labels={TEST_RUN_LABEL: RUN_ID}, state_dir=server_state)
    spec = llamacpp.container_spec(
        entry, CPU, settings, socket_endpoint(server_state), memory_need=need, user=server_user()
    )

    host, _ = asyncio.run(
        while_ready(
            spec,
            spec.endpoint.url + llamacpp.readiness_path,
            lambda info: asyncio.to_thread(host_config, engine, info.id),
            servers_dir(server_state),
        )
    )
    assert host["Memory"] == host["MemorySwap"] == memory_limit_for(need)  # no swap beyond the limit
    assert our_containers(engine, spec.owner) == []


@pytest.fixture(scope="module")
def standin(engine) -> str:
    return ensure_standin_image(engine)


def test_the_ollama_server_is_confined_and_still_serves(start_daemon, standin, engine, tmp_path):
    section = {
        "image": standin,
        "models_dir": str(tmp_path / "ollama-store"),
        "startup_timeout": 30,
        "env": {"STANDIN_REGISTRY": json.dumps(REGISTRY), "STANDIN_PULL_SECONDS": "0.2"},
    }
    daemon = start_daemon(
        [{"name": "chat-a", "backend": "ollama", "tag": "tiny-a:1b", "pull": True, "preload": True}],
        top={"ollama": section},
    )
    assert daemon.model("chat-a")["state"] == "ready"
    [server] = our_containers(engine, daemon.instance)
    host, _ = host_config(engine, server)
    assert_confined(host)
    assert host["PidsLimit"] == ollama.PIDS_LIMIT
    answer = daemon.chat("chat-a")
    assert answer.status_code == 200, answer.text
    assert (tmp_path / "ollama-store" / "models" / "manifests").is_dir()  # the pull wrote the store


def test_the_ollama_server_runs_as_the_owner_of_a_store_root_cannot_write(engine, standin, tmp_path):
    # The daemon runs as its own user and makes the store 0700 (UMask=0077): root without capabilities
    # cannot even enter it, so the server must run as the store's owner.
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    os.chown(store, 4242, 4242)
    config = Config.model_validate(
        {
            "profile": "cpu-only",
            "daemon": {"instance": f"hd{RUN_ID}", "labels": {TEST_RUN_LABEL: RUN_ID}, "state_dir": str(tmp_path)},
            "ollama": {
                "image": standin,
                "models_dir": str(store),
                "env": {"STANDIN_REGISTRY": json.dumps(REGISTRY), "STANDIN_PULL_SECONDS": "0.1"},
            },
        }
    )
    spec = ollama.server_spec(config, CPU, socket_endpoint(tmp_path, (4242, 4242)), store_owner=(4242, 4242))
    url = spec.endpoint.url

    async def pull_then_inspect(info):
        async with open_session(servers_dir(tmp_path)) as session:
            async with session.post(f"{url}/api/pull", json={"model": "tiny-a:1b", "stream": False}) as pulled:
                return pulled.status, await pulled.text(), host_config(engine, info.id)

    status, text, (host, container_config) = asyncio.run(
        while_ready(spec, url + ollama.readiness_path, pull_then_inspect, servers_dir(tmp_path))
    )
    assert status == 200, text
    assert_confined(host)
    assert container_config["User"] == "4242:4242"
    written = [path for path in store.rglob("*") if path.is_file()]
    assert written and all(path.stat().st_uid == 4242 for path in written)
    assert our_containers(engine, spec.owner) == []
