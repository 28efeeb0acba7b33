"""The Docker boundary and the startup gate, on the real engine."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import psutil
import pytest

from supervisor.config.profiles import load_profiles
from supervisor.config.settings import DaemonSettings, ModelEntry
from supervisor.core.backends import llamacpp
from supervisor.core.errors import DockerUnavailable, ImageNotFound, ModelStartFailed
from supervisor.runtime.docker_runtime import DockerRuntime
from supervisor.runtime.health import wait_until_ready
from supervisor.runtime.upstream import open_session, server_user

from .conftest import RUN_ID, TEST_RUN_LABEL, our_containers, socket_endpoint


def spec_for(models_dir, gguf: str, instance: str, state_dir: Path, **profile_changes):
    profile = load_profiles()["cpu-only"]
    if profile_changes:
        images = profile.defaults.images.model_copy(update=profile_changes)
        profile = profile.model_copy(update={"defaults": profile.defaults.model_copy(update={"images": images})})
    settings = DaemonSettings(instance=instance, labels={TEST_RUN_LABEL: RUN_ID}, state_dir=state_dir)
    entry = ModelEntry(name=gguf.removesuffix(".gguf"), gguf=models_dir / gguf, context_size=256)
    return llamacpp.container_spec(entry, profile, settings, socket_endpoint(state_dir), user=server_user())


def servers_dir_of(spec) -> Path:
    """The directory of the servers' socket directories: the parent of the one mounted for ``spec``."""
    return Path(next(m.source for m in spec.mounts if m.target == llamacpp.SOCKET_DIR)).parent


async def start_and_gate(spec, deadline: float) -> tuple[DockerRuntime, str, float]:
    runtime = DockerRuntime()
    await runtime.connect()
    info = await runtime.run(spec)
    async with open_session(servers_dir_of(spec)) as session:
        try:
            took = await wait_until_ready(
                runtime,
                session,
                model=spec.model,
                container_id=info.id,
                url=spec.endpoint.url + llamacpp.readiness_path,
                deadline=deadline,
            )
        except BaseException:
            await runtime.stop_and_remove(info.id, 0)
            await runtime.close()
            raise
    return runtime, info.id, took


def test_run_gate_and_stop_a_real_llama_server(engine, models_dir, server_state):
    spec = spec_for(models_dir, "tiny.gguf", f"rt{RUN_ID}", server_state)

    async def scenario():
        runtime, container_id, took = await start_and_gate(spec, deadline=30)
        info = await runtime.inspect(container_id)
        await runtime.stop_and_remove(container_id, grace=5)
        gone = await runtime.inspect(container_id)
        await runtime.close()
        return info, took, gone

    info, took, gone = asyncio.run(scenario())
    assert info.running and info.labels["io.localllm.config-hash"] == spec.config_hash()
    assert 0 < took < 30
    assert gone is None
    assert our_containers(engine, spec.owner) == []


def test_the_images_own_health_check_is_disabled(engine, models_dir, server_state):
    # The llama.cpp images declare a check on port 8080, where our servers never listen: without this
    # Docker marks every container unhealthy.
    spec = spec_for(models_dir, "tiny.gguf", f"rt{RUN_ID}", server_state)

    async def scenario():
        runtime, container_id, _ = await start_and_gate(spec, deadline=30)
        config = engine.api.inspect_container(container_id)["Config"]
        await runtime.stop_and_remove(container_id, grace=5)
        await runtime.close()
        return config

    assert asyncio.run(scenario())["Healthcheck"] == {"Test": ["NONE"]}


def test_gate_reports_exit_code_and_log_tail(engine, models_dir, server_state):
    spec = spec_for(models_dir, "broken.gguf", f"rt{RUN_ID}", server_state)
    with pytest.raises(ModelStartFailed) as caught:
        asyncio.run(start_and_gate(spec, deadline=30))
    assert caught.value.container_exit_code == 1
    assert "failed to load model" in caught.value.log_tail
    assert our_containers(engine, spec.owner) == []


def test_gate_deadline_is_a_failure_with_the_last_answer(engine, models_dir, server_state):
    spec = spec_for(models_dir, "tiny.gguf", f"rt{RUN_ID}", server_state)
    # The server listens elsewhere than the gate probes: alive, never ready.
    spec = dataclasses.replace(spec, command=spec.command + ("--host", "127.0.0.1"))
    with pytest.raises(ModelStartFailed) as caught:
        asyncio.run(start_and_gate(spec, deadline=1.0))
    assert caught.value.reason == "not ready within 1s (last health check: no answer)"
    assert "model loaded" in caught.value.log_tail
    assert our_containers(engine, spec.owner) == []


async def run_once(spec) -> None:
    """Run ``spec`` with a runtime of its own, closed afterwards."""
    runtime = DockerRuntime()
    await runtime.connect()
    try:
        await runtime.run(spec)
    finally:
        await runtime.close()


def test_a_start_cancelled_while_the_engine_creates_leaves_no_container(engine, models_dir, server_state):
    spec = spec_for(models_dir, "tiny.gguf", f"rt{RUN_ID}", server_state)

    async def scenario():
        runtime = DockerRuntime()
        await runtime.connect()
        try:
            starting = asyncio.create_task(runtime.run(spec))
            while not await asyncio.to_thread(our_containers, engine, spec.owner):  # the engine has made it
                await asyncio.sleep(0.001)
            starting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await starting
        finally:
            await runtime.close()

    asyncio.run(scenario())
    assert our_containers(engine, spec.owner) == []  # removed by the runtime, not left for a sweep


def test_missing_image_names_the_command_that_builds_it(engine, models_dir, server_state):
    spec = spec_for(models_dir, "tiny.gguf", f"rt{RUN_ID}", server_state, llamacpp="localllm/llama-server:0.0.0-cpu")

    with pytest.raises(
        ImageNotFound,
        match=r"image 'localllm/llama-server:0.0.0-cpu' not found.*"
        r"localllmctl image build --version 0.0.0",
    ):
        asyncio.run(run_once(spec))


def test_unreachable_engine_is_named(tmp_path):
    url = f"unix://{tmp_path}/no-docker.sock"

    async def scenario():
        runtime = DockerRuntime(url)
        try:
            await runtime.connect()
        finally:
            await runtime.close()

    with pytest.raises(DockerUnavailable, match=f"Docker engine not reachable at {url}"):
        asyncio.run(scenario())


def test_a_model_file_nobody_can_read_is_refused_before_a_container_is_made(engine, models_dir, tmp_path, server_state):
    # llama-server runs as nobody: a 0600 file would make it exit with "Permission denied" on the path
    # inside the container; the runtime names the host's file and the fix instead.
    private = tmp_path / "private.gguf"
    private.write_bytes((models_dir / "tiny.gguf").read_bytes())
    private.chmod(0o600)
    spec = spec_for(tmp_path, "private.gguf", f"rt{RUN_ID}", server_state)

    with pytest.raises(
        ModelStartFailed,
        match=rf"{private} is not readable by the container's user 65534:65534 "
        rf"\(mode 0600.*chmod o\+r {private}",
    ):
        asyncio.run(run_once(spec))
    assert our_containers(engine, spec.owner) == []


def test_the_connections_to_the_engine_stay_within_the_runtimes_workers(engine):
    """The SDK pools connections per request URL (per container), 25 pools by default: a daemon that had
    touched 25 containers held 25 idle connections, and more after a burst. Ours are at most ``workers``."""

    def engine_connections() -> int:
        mine = {c.fd for c in psutil.Process().net_connections(kind="unix")}
        return len(mine)

    async def body() -> int:
        runtime = DockerRuntime(workers=4)
        await runtime.connect()
        before = engine_connections()
        try:
            for round_ in range(3):  # 40 containers' URLs (gone ones: the engine answers 404), 4 at a time
                ids = [f"{round_}{n:02d}".ljust(64, "0") for n in range(40)]
                assert await asyncio.gather(*(runtime.inspect(i) for i in ids)) == [None] * 40
            return engine_connections() - before
        finally:
            await runtime.close()

    grown = asyncio.run(body())
    assert 0 < grown <= 2 * 4, f"{grown} more unix sockets after 120 inspections by a runtime of 4 workers"
