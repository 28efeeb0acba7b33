"""The soak's test bed: generated models, a budget that holds two, a real localllmd subprocess, its state on a tmpfs.

Everything the bed creates is its own: the daemon runs as a unique ``daemon.instance`` (the owner label of its
containers), every container also carries ``io.localllm.soak=<run id>`` (and the labels a caller adds, such as
the integration tests' ``io.localllm.test-run``), and cleanup removes only containers with that owner label.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import docker
import yaml

from supervisor.config.profiles import builtin_profiles_dir
from supervisor.core.containers import LABEL_OWNER
from supervisor.runtime.tinygguf import write_tiny_model

BIN = Path(sys.executable).parent
SOAK_LABEL = "io.localllm.soak"
GIB = 2**30
MODEL_NEED = "1GiB"  # declared for every model: the budget below holds two of them, never three
BUDGET_GIB = 2.5
STATE_TMPFS = "1m"  # the state directory's tmpfs: room for the generations, small enough to fill in a moment

# The daemon's settings: short periods, so that a fault is noticed and repaired within seconds.
LIVENESS = {"period": 1.0, "timeout": 1.0, "failure_threshold": 3}
RESTART = {"delay": "0.5s", "max_delay": "4s", "stable_after": "5s", "max_failures": 5}
STOP_GRACE = 3.0
QUEUE_TIMEOUT = 30.0
STARTUP_TIMEOUT = 30.0


@dataclass(frozen=True)
class ModelFile:
    name: str
    path: Path
    weight: float  # its share of the load: two hot models, two cold ones
    preload: bool


class ControlClient:
    """GET on the daemon's admin socket with plain http.client: cheap enough to call every second."""

    def __init__(self, path: Path):
        self.path = path

    def get(self, route: str, timeout: float = 5.0) -> dict:
        connection = _UnixConnection(str(self.path), timeout)
        try:
            connection.request("GET", route, headers={"Host": "localllmd"})
            answer = connection.getresponse()
            body = answer.read()
            if answer.status != 200:
                raise OSError(f"GET {route}: {answer.status} {body[:200]!r}")
            return json.loads(body)
        finally:
            connection.close()


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localllmd", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bed:
    """The models, the profile, the config files, the state directory, and the daemon subprocess."""

    def __init__(self, workdir: Path, labels: dict[str, str] | None = None, log=print):
        self.workdir = workdir
        self.log = log
        self.run_id = uuid.uuid4().hex[:8]
        self.instance = f"soak-{self.run_id}"
        self.port = free_port()
        self.proxy_url = f"http://127.0.0.1:{self.port}/v1"
        self.state_dir = workdir / "state"
        self.socket = self.state_dir / "control.sock"
        self.config_path = workdir / "config.yaml"
        self.log_path = workdir / "localllmd.log"
        self.labels = {SOAK_LABEL: self.run_id, **(labels or {})}
        self.models_dir = workdir / "models"
        self.broken = workdir / "broken.gguf"
        self.tmpfs = False  # the state directory is a tmpfs of its own (the full-disk fault needs it)
        self.tmpfs_problem: str | None = None
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.docker = self.new_docker_client()
        self.control = ControlClient(self.socket)
        self.models: list[ModelFile] = []
        self.config: dict = {}

    # -- setup --------------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        self.models_dir.mkdir(parents=True)
        shapes = [("alpha", 0.4, True), ("beta", 0.35, True), ("gamma", 0.15, False), ("delta", 0.1, False)]
        for seed, (name, weight, preload) in enumerate(shapes, start=11):
            path = self.models_dir / f"{name}.gguf"
            # A little larger than the default tiny one, so that a stream lasts long enough to be cut.
            write_tiny_model(path, embedding=128, blocks=3, heads=4, kv_heads=2, seed=seed, name=f"soak-{name}")
            self.models.append(ModelFile(name, path, weight, preload))
        self.broken.write_bytes(b"GGUF" + b"\x00" * 60 + b"not a model")  # exists, but llama-server cannot load it
        profile = yaml.safe_load((builtin_profiles_dir() / "cpu-only.yaml").read_text())
        profile["name"] = "soak-budget"
        profile["description"] = "the soak's budget: room for two of its models, not three"
        profile["hardware"]["ram_gib"] = BUDGET_GIB
        profile["defaults"]["ram_reserve_gib"] = 0
        (self.workdir / "profiles").mkdir()
        (self.workdir / "profiles" / "soak-budget.yaml").write_text(yaml.safe_dump(profile))
        self.state_dir.mkdir()
        self._mount_state()
        self.config = {
            "profile": "soak-budget",
            "profiles_dir": str(self.workdir / "profiles"),
            "daemon": {
                "instance": self.instance,
                "proxy_listen": f"127.0.0.1:{self.port}",
                "state_dir": str(self.state_dir),
                "labels": self.labels,
                "startup_timeout": f"{STARTUP_TIMEOUT:g}s",
                "stop_grace": f"{STOP_GRACE:g}s",
                "default_ttl": "2m",
                "min_residency": "2s",
                "max_queue": 64,
                "queue_timeout": f"{QUEUE_TIMEOUT:g}s",
                "restart": RESTART,
                "liveness": {
                    "period": f"{LIVENESS['period']:g}s",
                    "timeout": f"{LIVENESS['timeout']:g}s",
                    "failure_threshold": LIVENESS["failure_threshold"],
                },
                "log_level": "INFO",
            },
            "models": [
                {"name": m.name, "gguf": str(m.path), "context_size": 256, "memory": MODEL_NEED, "preload": m.preload}
                for m in self.models
            ],
        }
        self.write_main(self.config)

    def _mount_state(self) -> None:
        if os.geteuid() != 0:
            self.tmpfs_problem = "not root: the state directory cannot be a tmpfs of its own"
            return
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={STATE_TMPFS}", "tmpfs", str(self.state_dir)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            self.tmpfs_problem = f"mount -t tmpfs failed: {done.stderr.strip()}"
            return
        self.tmpfs = True

    def text_of(self, config: dict) -> str:
        return yaml.safe_dump(config, sort_keys=False)

    def write_main(self, config: dict) -> None:
        """The config the daemon starts with, and the one a good apply applies: what is active is always on disk."""
        self.config_path.write_text(self.text_of(config))
        self.config = copy.deepcopy(config)

    def write_other(self, name: str, config: dict | str) -> Path:
        path = self.workdir / name
        path.write_text(config if isinstance(config, str) else self.text_of(config))
        return path

    # -- the daemon ---------------------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    def start_daemon(self, timeout: float = 60) -> float:
        """Start localllmd on the main config; returns the seconds until its control API answers."""
        self.starts += 1
        with self.log_path.open("a") as log:
            log.write(f"\n=== soak: localllmd start #{self.starts} at {time.strftime('%H:%M:%S')} ===\n")
            log.flush()
            started = time.monotonic()
            self.process = subprocess.Popen(
                [str(BIN / "localllmd"), "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=os.environ.copy(),
            )
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"localllmd exited with {self.process.returncode}:\n{self.log_tail(40)}")
            with contextlib.suppress(OSError, ValueError):
                self.control.get("/status", timeout=2)
                return time.monotonic() - started
            time.sleep(0.05)
        raise RuntimeError(f"localllmd's control API did not answer within {timeout}s:\n{self.log_tail(40)}")

    def kill_daemon(self) -> None:
        """kill -9: its containers stay, as after a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop_daemon(self, timeout: float = 60) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(30)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int, limit: int = 60) -> str:
        """The daemon's log lines written since byte ``offset`` (the last ``limit`` of them)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-limit:])

    def ctl(self, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess | None, float]:
        """Run localllmctl against this daemon; returns (the result, or None if it ran past ``timeout``; seconds)."""
        started = time.monotonic()
        try:
            done = subprocess.run(
                [str(BIN / "localllmctl"), "--socket", str(self.socket), *args],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return None, time.monotonic() - started
        return done, time.monotonic() - started

    # -- the engine's side --------------------------------------------------------------------------------------

    def containers(self, client: docker.DockerClient | None = None) -> list[dict]:
        """Our containers as one engine call lists them (all states): no race with a removal halfway. A thread
        other than the driver's passes a ``client`` of its own."""
        return (client or self.docker).api.containers(all=True, filters={"label": f"{LABEL_OWNER}={self.instance}"})

    @staticmethod
    def new_docker_client() -> docker.DockerClient:
        return docker.from_env(timeout=30)

    def container(self, container_id: str):
        return self.docker.containers.get(container_id)

    def running_container_of(self, model: str):
        for c in self.containers():
            if c["Labels"].get("io.localllm.model") == model and c["State"] == "running":
                return self.docker.containers.get(c["Id"])
        return None

    # -- cleanup ------------------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_daemon()
        with contextlib.suppress(Exception):
            for c in self.containers():
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    self.docker.api.remove_container(c["Id"], force=True)
        with contextlib.suppress(Exception):
            for network in self.docker.networks.list(filters={"label": f"{LABEL_OWNER}={self.instance}"}):
                with contextlib.suppress(docker.errors.APIError):
                    network.remove()
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.state_dir)], check=False, capture_output=True)
            self.tmpfs = False
        with contextlib.suppress(Exception):
            self.docker.close()

    def remove_workdir(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
