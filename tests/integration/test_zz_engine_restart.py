"""The Docker engine restarts under a running localllmd: it keeps running, reconnects and reconciles.

This test restarts the machine's dockerd, so it runs last (the file name sorts last, and
conftest moves it to the end): a failure here cannot disturb the others.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import docker

from supervisor.runtime.images import cache_root

from .conftest import our_containers, poll_for


def restart_dockerd() -> None:
    pid = int(subprocess.check_output(["pgrep", "-xo", "dockerd"]).split()[0])
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    os.kill(pid, signal.SIGTERM)
    poll_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=60, what="dockerd to stop", interval=0.2)
    cache_root().mkdir(parents=True, exist_ok=True)
    argv = [arg.decode() for arg in command] or [shutil.which("dockerd") or "/usr/sbin/dockerd"]
    # Started the way scripts/dev.sh starts it: detached, so it outlives the tests.
    subprocess.run(["sh", "-c", f'nohup "$@" >>"{cache_root() / "dockerd.log"}" 2>&1 &', "sh", *argv], check=True)

    def engine_answers() -> bool:
        with socket.socket(socket.AF_UNIX) as probe:  # the SDK leaks its socket when nobody listens
            try:
                probe.connect("/var/run/docker.sock")
            except OSError:
                return False
        try:
            client = docker.from_env()
        except docker.errors.DockerException:
            return False
        try:
            return client.ping()
        except docker.errors.DockerException:
            return False
        finally:
            client.close()

    poll_for(engine_answers, timeout=60, what="dockerd to come back", interval=0.5)


def test_the_daemon_survives_an_engine_restart_and_brings_its_models_back(start_daemon, engine):
    daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf", "preload": True}])
    [before] = our_containers(engine, daemon.instance)
    restart_dockerd()
    poll_for(lambda: "Docker engine is back" in daemon.log(), timeout=60, what="the daemon to notice")
    poll_for(
        lambda: [c for c in our_containers(engine, daemon.instance) if c.status == "running" and c.id != before.id],
        timeout=30,
        what="a new container",
    )
    assert len(our_containers(engine, daemon.instance)) == 1  # the dead one was removed
    poll_for(lambda: daemon.model("tiny")["state"] == "ready", timeout=30, what="tiny to be ready")
    assert daemon.process.poll() is None
    assert "Docker engine not reachable" in daemon.log()
    assert daemon.chat("tiny").status_code == 200
