"""Cold-start and swap latency through localllm, against a raw ``docker run`` of the same server.

    .venv/bin/python bench/swap_bench.py [--runs 7]      (after: bash scripts/dev.sh setup)

Writes bench/results/swap.md and swap.json. Every figure is min / median / max
over the runs, and the ratios are computed from medians measured in the same run.

- raw: ``docker run`` (SDK) of the llama-server image with the model, until
  ``/health`` answers 200; then the first streamed token of a request.
- cold: a streamed request through localllm for a model that is not loaded,
  until its first token. The model unloads between runs by a 1 s TTL.
- swap: budget for one model; a streamed request for B while A is loaded and
  idle, until B's first token (stop A, free, start B, first token).
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from supervisor import __version__  # noqa: E402
from supervisor.config import ModelEntry  # noqa: E402
from supervisor.images import cpu_image_tag  # noqa: E402
from supervisor.profiles import load_profiles  # noqa: E402
from supervisor.sizing import size_model  # noqa: E402
from supervisor.tinygguf import write_tiny_model  # noqa: E402

BIN = Path(sys.executable).parent
CHAT = {"stream": True, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_token_seconds(url: str, model: str) -> float:
    started = time.perf_counter()
    with requests.post(f"{url}/v1/chat/completions", json={"model": model, **CHAT}, stream=True, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                return time.perf_counter() - started
    raise RuntimeError("stream ended without a token")


def raw_run(engine, model: Path) -> tuple[float, float]:
    """(docker run until /health 200, then first token) in seconds."""
    port = free_port()
    started = time.perf_counter()
    container = engine.containers.run(
        cpu_image_tag(), ["-m", "/models/m.gguf", "--host", "127.0.0.1", "--port", str(port), "-c", "256",
                          "--parallel", "1"],
        detach=True, network_mode="host", labels={"io.localllm.bench": "raw"},
        volumes={str(model): {"bind": "/models/m.gguf", "mode": "ro"}})
    try:
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.005)
        ready = time.perf_counter() - started
        return ready, first_token_seconds(f"http://127.0.0.1:{port}", "m")
    finally:
        container.remove(force=True)


class Daemon:
    def __init__(self, workdir: Path, models: list[dict], ram_gib: float | None = None):
        self.port = free_port()
        self.state = workdir / f"state-{self.port}"
        config = {"profile": "cpu-only",
                  "daemon": {"instance": f"bench{self.port}", "proxy_listen": f"127.0.0.1:{self.port}",
                             "state_dir": str(self.state), "min_residency": 0, "log_level": "WARNING"},
                  "models": models}
        if ram_gib is not None:
            profile = yaml.safe_load((ROOT / "profiles" / "cpu-only.yaml").read_text())
            profile.update(name="bench-budget")
            profile["hardware"]["ram_gib"] = ram_gib
            profile["defaults"]["ram_reserve_gib"] = 0
            (workdir / "profiles").mkdir(exist_ok=True)
            (workdir / "profiles" / "bench-budget.yaml").write_text(yaml.safe_dump(profile))
            config.update(profile="bench-budget", profiles_dir=str(workdir / "profiles"))
        path = workdir / f"config-{self.port}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([str(BIN / "localllmd"), "--config", str(path)])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.url}/health", timeout=1)
                return
            except requests.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("localllmd did not come up")

    def state_of(self, model: str) -> str:
        out = subprocess.run([str(BIN / "localllmctl"), "--socket", str(self.state / "control.sock"), "status",
                              "--json"], capture_output=True, text=True, check=True).stdout
        return next(m["state"] for m in json.loads(out)["models"] if m["name"] == model)

    def wait_stopped(self, model: str) -> None:
        while self.state_of(model) != "stopped":
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)


def summary(values: list[float]) -> dict:
    return {"min_ms": round(min(values) * 1000, 1), "median_ms": round(statistics.median(values) * 1000, 1),
            "max_ms": round(max(values) * 1000, 1), "runs": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    engine = docker.from_env()
    with tempfile.TemporaryDirectory(prefix="localllm-bench-") as tmp:
        workdir = Path(tmp)
        a = write_tiny_model(workdir / "a.gguf", seed=1, name="a")
        b = write_tiny_model(workdir / "b.gguf", seed=2, name="b")
        raw_ready, raw_token = zip(*(raw_run(engine, a) for _ in range(args.runs)))

        cold_daemon = Daemon(workdir, [{"name": "a", "gguf": str(a), "context_size": 256, "ttl": "1s"}])
        cold = []
        for _ in range(args.runs):
            cold_daemon.wait_stopped("a")
            cold.append(first_token_seconds(cold_daemon.url, "a"))
        cold_daemon.stop()

        need = size_model(ModelEntry(name="a", gguf=a, context_size=256), load_profiles()["cpu-only"]).need
        swap_daemon = Daemon(workdir, [{"name": "a", "gguf": str(a), "context_size": 256},
                                       {"name": "b", "gguf": str(b), "context_size": 256}],
                             ram_gib=1.5 * need / 1024**3)
        swaps = []
        first_token_seconds(swap_daemon.url, "a")
        for i in range(args.runs):
            swaps.append(first_token_seconds(swap_daemon.url, "b" if i % 2 == 0 else "a"))
        swap_daemon.stop()
    engine.close()

    raw_total = [r + t for r, t in zip(raw_ready, raw_token)]
    med = statistics.median
    report = {
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": __import__("os").cpu_count(), "localllm": __version__,
                    "docker": docker.from_env().version()["Version"], "image": cpu_image_tag()},
        "raw_docker_run_to_health": summary(raw_ready),
        "raw_first_token_after_health": summary(raw_token),
        "raw_run_to_first_token": summary(raw_total),
        "localllm_cold_request_to_first_token": summary(cold),
        "localllm_swap_a_to_b_first_token": summary(swaps),
        "ratio_cold_first_token_to_raw_health": round(med(cold) / med(raw_ready), 3),
        "ratio_cold_first_token_to_raw_first_token": round(med(cold) / med(raw_total), 3),
        "localllm_share_of_cold_ms": round((med(cold) - med(raw_total)) * 1000, 1),
        "localllm_share_of_swap_ms": round((med(swaps) - med(raw_total)) * 1000, 1),
    }
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "swap.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "swap.md").write_text(render(report))
    print(render(report))


def render(report: dict) -> str:
    rows = [(k, v) for k, v in report.items() if isinstance(v, dict) and "median_ms" in v]
    lines = ["# Cold start and swap", "", f"Command: `.venv/bin/python bench/swap_bench.py`; machine: "
             f"{report['machine']}", "", "| measurement | min ms | median ms | max ms | runs |",
             "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['min_ms']} | {v['median_ms']} | {v['max_ms']} | {v['runs']} |" for k, v in rows]
    lines += ["", f"- cold first token / raw docker-run-to-health (medians): "
              f"{report['ratio_cold_first_token_to_raw_health']}",
              f"- cold first token / raw docker-run-to-first-token (medians): "
              f"{report['ratio_cold_first_token_to_raw_first_token']}",
              f"- localllm's own share of a cold request: {report['localllm_share_of_cold_ms']} ms (median)",
              f"- localllm's own share of a swap (stop A, start B): {report['localllm_share_of_swap_ms']} ms (median)",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
