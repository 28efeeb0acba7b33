"""What every benchmark shares: ports, statistics, machine facts, a localllmd under test, a raw llama-server.

Figures are reported as min / median / max (and p50 / p99 where a distribution
matters) over repeated runs; ratios are computed from values measured in the
same run, never across runs or machines.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from supervisor import __version__  # noqa: E402
from supervisor.core.backends.llamacpp import launch_flags  # noqa: E402
from supervisor.core.estimate import LaunchSettings  # noqa: E402
from supervisor.runtime.images import cpu_image_tag  # noqa: E402

BIN = Path(sys.executable).parent
BENCH_LABEL = "io.localllm.bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), by linear interpolation between closest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary_ms(values: list[float]) -> dict:
    """Seconds in, milliseconds out: min, p50, p99, max, mean and the count."""
    return {
        "min_ms": round(min(values) * 1000, 3),
        "p50_ms": round(percentile(values, 50) * 1000, 3),
        "p99_ms": round(percentile(values, 99) * 1000, 3),
        "max_ms": round(max(values) * 1000, 3),
        "mean_ms": round(statistics.fmean(values) * 1000, 3),
        "n": len(values),
    }


def spread(values: list[float], digits: int = 3) -> dict:
    """min / median / max of repeated runs of one figure (any unit)."""
    return {
        "min": round(min(values), digits),
        "median": round(statistics.median(values), digits),
        "max": round(max(values), digits),
        "runs": len(values),
    }


def machine_facts() -> dict:
    import docker

    client = docker.from_env()
    try:
        engine = client.version().get("Version", "?")
    finally:
        client.close()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "localllm": __version__,
        "docker": engine,
        "llama_server_image": cpu_image_tag(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


class Daemon:
    """A real localllmd subprocess on a config of its own; ``url`` is the proxy root, ``socket`` the control API."""

    def __init__(
        self, workdir: Path, models: list[dict], ram_gib: float | None = None, notify: bool = False, **daemon_settings
    ):
        self.workdir = workdir
        self.port = free_port()
        self.instance = daemon_settings.pop("instance", f"bench{self.port}")
        self.state = Path(daemon_settings.pop("state_dir", workdir / f"state-{self.port}"))
        self.config = {
            "profile": "cpu-only",
            "daemon": {
                "instance": self.instance,
                "proxy_listen": f"127.0.0.1:{self.port}",
                "state_dir": str(self.state),
                "min_residency": 0,
                "log_level": "WARNING",
                "labels": {BENCH_LABEL: "1"},
                **daemon_settings,
            },
            "models": models,
        }
        if ram_gib is not None:
            profile = yaml.safe_load((ROOT / "profiles" / "cpu-only.yaml").read_text())
            profile.update(name="bench-budget")
            profile["hardware"]["ram_gib"] = ram_gib
            profile["defaults"]["ram_reserve_gib"] = 0
            (workdir / "profiles").mkdir(exist_ok=True)
            (workdir / "profiles" / "bench-budget.yaml").write_text(yaml.safe_dump(profile))
            self.config.update(profile="bench-budget", profiles_dir=str(workdir / "profiles"))
        self.config_path = workdir / f"config-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.url = f"http://127.0.0.1:{self.port}"
        self.socket = self.state / "control.sock"
        self.log_path = workdir / f"localllmd-{self.port}.log"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self, env: dict | None = None) -> float:
        """Start localllmd; returns the seconds until its proxy answers."""
        started = time.perf_counter()
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                [str(BIN / "localllmd"), "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"localllmd exited: {self.log_path.read_text()[-2000:]}")
            try:
                requests.get(f"{self.url}/health", timeout=1)
                return time.perf_counter() - started
            except requests.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("localllmd did not come up within 60 s")

    def ctl(self, *args: str) -> str:
        return subprocess.run(
            [str(BIN / "localllmctl"), "--socket", str(self.socket), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout

    def status(self) -> dict:
        return json.loads(self.ctl("status", "--json"))

    def state_of(self, model: str) -> str:
        return next(m["state"] for m in self.status()["models"] if m["name"] == model)

    def wait_state(self, model: str, state: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.state_of(model) != state:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{model} not {state} within {timeout}s")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """kill -9: its containers stay, as after a crash."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=120)


def raw_llama_server(
    engine, model: Path, port: int, parallel: int = 1, context: int = 256, extra_args: tuple[str, ...] = ()
):
    """The same server localllm would run, started directly with ``docker run`` (host network, 127.0.0.1),
    with the same pinned flags (context, slots, cache, flash attention, fit) as localllm's containers."""
    pinned = launch_flags(LaunchSettings(context=context, parallel=parallel))
    return engine.containers.run(
        cpu_image_tag(),
        ["-m", "/models/m.gguf", "--host", "127.0.0.1", "--port", str(port), *pinned, *extra_args],
        detach=True,
        network_mode="host",
        labels={BENCH_LABEL: "raw"},
        volumes={str(model): {"bind": "/models/m.gguf", "mode": "ro"}},
    )


def wait_healthy(url: str, timeout: float = 60) -> float:
    """Seconds until ``url``/health answers 200."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return time.perf_counter() - started
        except requests.ConnectionError:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"{url} not healthy within {timeout}s")


def remove_bench_containers() -> None:
    import docker

    client = docker.from_env()
    try:
        for container in client.containers.list(all=True, filters={"label": BENCH_LABEL}):
            container.remove(force=True)
    finally:
        client.close()


def process_tree_usage(pid: int) -> tuple[int, float]:
    """(RSS bytes, CPU seconds user+system) of a process and its children."""
    process = psutil.Process(pid)
    members = [process, *process.children(recursive=True)]
    rss = sum(p.memory_info().rss for p in members if p.is_running())
    cpu = sum(sum(p.cpu_times()[:2]) for p in members if p.is_running())
    return rss, cpu
