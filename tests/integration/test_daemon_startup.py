"""How localllmd starts, refuses to start (bad config, busy port, no engine: it starts nothing) and stops."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from supervisor.cli.client import ControlClient, Target

from .conftest import RUN_ID, executable, free_tcp_port, our_containers, poll_for


def run_daemon(config_path, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [executable("localllmd"), "--config", str(config_path)], capture_output=True, text=True, timeout=timeout
    )


def write_config(tmp_path, models_dir, instance, **daemon) -> str:
    config = {
        "profile": "cpu-only",
        "daemon": {
            "instance": instance,
            "state_dir": str(tmp_path / "state"),
            "proxy_listen": f"127.0.0.1:{free_tcp_port()}",
            **daemon,
        },
        "models": [{"name": "tiny", "gguf": str(models_dir / "tiny.gguf"), "preload": True}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_bad_config_exits_2_and_starts_nothing(engine, models_dir, tmp_path):
    instance = f"bad{RUN_ID}"
    path = write_config(tmp_path, models_dir, instance)
    path.write_text(path.read_text() + "surprise: 1\n")
    done = run_daemon(path)
    assert done.returncode == 2
    assert f"{path}:" in done.stderr and "surprise: unknown key" in done.stderr
    assert our_containers(engine, instance) == []


def test_busy_proxy_port_is_named_and_nothing_is_left_running(engine, models_dir, tmp_path):
    instance = f"busy{RUN_ID}"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = run_daemon(write_config(tmp_path, models_dir, instance, proxy_listen=f"127.0.0.1:{port}"))
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (daemon.proxy_listen)" in done.stderr
    assert our_containers(engine, instance) == []


def test_unreachable_engine_exits_3_with_its_address(models_dir, tmp_path):
    url = f"unix://{tmp_path}/absent.sock"
    done = run_daemon(write_config(tmp_path, models_dir, f"nodocker{RUN_ID}", docker_url=url))
    assert done.returncode == 3
    assert f"Docker engine not reachable at {url}" in done.stderr


def test_a_second_daemon_on_the_same_state_dir_is_refused(start_daemon, engine):
    first = start_daemon([{"name": "tiny", "gguf": "tiny.gguf", "preload": True}])
    [container] = our_containers(engine, first.instance)
    done = run_daemon(first.config_path)
    assert done.returncode == 1
    assert f"another localllmd (pid {first.process.pid}) is running with state_dir" in done.stderr
    assert [c.id for c in our_containers(engine, first.instance)] == [container.id]
    assert first.chat("tiny").status_code == 200


def test_the_control_api_describes_one_model(start_daemon):
    daemon = start_daemon([{"name": "tiny", "aliases": ["t"], "gguf": "tiny.gguf", "preload": True}])
    model = asyncio.run(ControlClient(Target(socket=daemon.socket)).get("/models/t"))
    assert model["name"] == "tiny" and model["state"] == "ready" and model["memory"]["need"] > 0


def test_under_systemd_it_notifies_ready_status_watchdog_and_stopping(start_daemon, tmp_path):
    received: list[tuple[float, bytes]] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "notify.sock"))
    server.settimeout(0.2)

    def receive() -> None:
        while server.fileno() != -1:
            try:
                received.append((time.monotonic(), server.recv(4096)))
            except (TimeoutError, OSError):
                continue

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    daemon = start_daemon(
        [{"name": "tiny", "gguf": "tiny.gguf", "preload": True}],
        env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"},
    )
    poll_for(lambda: any(m == b"STATUS=1 ready" for _, m in received), timeout=10, what="the ready status")
    assert daemon.terminate() == 0
    server.close()
    messages = [m for _, m in received]
    assert messages[0].startswith(b"READY=1\nSTATUS=")
    assert messages.count(b"WATCHDOG=1") >= 3
    assert any(m.startswith(b"STOPPING=1") for m in messages)


def test_the_daemon_raises_its_open_files_limit(start_daemon):
    """Each waiting client holds a descriptor, each stream two: a soft limit of 1024 caps it near 1,000 clients."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # what systemd gives by default; inherited
    try:
        daemon = start_daemon([{"name": "t", "gguf": "tiny.gguf"}])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with open(f"/proc/{daemon.process.pid}/limits") as limits:
        line = next(x for x in limits.read().splitlines() if x.startswith("Max open files"))
    expected = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    assert int(line.split()[3]) == expected, line


def test_the_demo_runs_in_a_private_directory_of_its_own_and_removes_it(engine, tmp_path):
    # A fixed /tmp path could be made beforehand by another local user, with their files or symlinks in it.
    log = tmp_path / "demo.log"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    with log.open("w") as out:
        daemon = subprocess.Popen([executable("localllmd"), "--demo"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        found = poll_for(lambda: re.search(r"demo state in (\S+)", log.read_text()), 30, "the demo's directory")
        state = Path(found.group(1))
        assert state.parent == tmp_path and state.name.startswith("localllm-demo-")
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        poll_for(lambda: "ready in" in log.read_text(), 60, "the demo model ready")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0, log.read_text()[-2000:]
    assert not state.exists()
    assert our_containers(engine, "demo") == []


def test_a_second_sigterm_ends_a_slow_shutdown_at_once(start_daemon, engine):
    # The model's server is stopped (SIGSTOP), so the shutdown's SIGTERM to it goes unheard and its stop takes
    # all of stop_grace; liveness would replace it first, so it is not probed in this test's time.
    daemon = start_daemon(
        [{"name": "tiny", "gguf": "tiny.gguf", "preload": True}], stop_grace=60, liveness={"period": 600}
    )
    [container] = our_containers(engine, daemon.instance)
    container.kill(signal="SIGSTOP")
    daemon.process.send_signal(signal.SIGTERM)
    first = time.monotonic()
    poll_for(
        lambda: "SIGTERM: shutting down; a second SIGTERM or SIGINT exits at once" in daemon.log(),
        10,
        "the graceful shutdown",
    )
    with pytest.raises(subprocess.TimeoutExpired):  # a shutdown not held up takes about a second here
        daemon.process.wait(timeout=5)
    daemon.process.send_signal(signal.SIGTERM)
    second = time.monotonic()
    status = daemon.process.wait(timeout=30)
    took = time.monotonic() - second
    print(f"exit {status} {took:.2f}s after the second SIGTERM, {second - first:.2f}s after the first")
    assert status == 143 and took < 3, (status, took)
    assert "SIGTERM again during the shutdown: exiting now with status 143" in daemon.log()
    assert "localllmd stopped cleanly" not in daemon.log()
    assert [c.id for c in our_containers(engine, daemon.instance)] == [container.id]  # left as a crash leaves it
