"""Cold-start and swap latency through localllm, against a raw ``docker run`` of the same server.

    .venv/bin/python -m bench.swap_bench [--runs 7]      (after: bash scripts/dev.sh setup)

- raw: ``docker run`` (SDK) of the llama-server image with the model, until
  ``/health`` answers 200; then the first streamed token of a request.
- cold: a streamed request through localllm for a model that is not loaded,
  until its first token. The model unloads between runs by a 1 s TTL.
- swap: budget for one model; a streamed request for B while A is loaded and
  idle, until B's first token (stop A, free, start B, first token).
Every figure is min / median / max over the runs; ratios come from medians of the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import docker
import requests

from bench.common import Daemon, free_port, raw_llama_server, spread, wait_healthy
from supervisor.config.profiles import load_profiles
from supervisor.config.settings import ModelEntry
from supervisor.fleet.sizing import size_model
from supervisor.runtime.tinygguf import write_tiny_model

CHAT = {"stream": True, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}


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
    container = raw_llama_server(engine, model, port)
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        ready = time.perf_counter() - started
        return ready, first_token_seconds(f"http://127.0.0.1:{port}", "m")
    finally:
        container.remove(force=True)


def run(workdir: Path, quick: bool = False, runs: int = 7) -> dict:
    runs = 2 if quick else runs
    engine = docker.from_env()
    a = write_tiny_model(workdir / "swap-a.gguf", seed=1, name="a")
    b = write_tiny_model(workdir / "swap-b.gguf", seed=2, name="b")
    try:
        raw_ready, raw_token = zip(*(raw_run(engine, a) for _ in range(runs)))
    finally:
        engine.close()

    cold_daemon = Daemon(workdir, [{"name": "a", "gguf": str(a), "context_size": 256, "ttl": "1s"}])
    cold = []
    try:
        for _ in range(runs):
            cold_daemon.wait_state("a", "stopped")
            cold.append(first_token_seconds(cold_daemon.url, "a"))
    finally:
        cold_daemon.stop()

    need = size_model(ModelEntry(name="a", gguf=a, context_size=256), load_profiles()["cpu-only"]).need
    swap_daemon = Daemon(
        workdir,
        [{"name": "a", "gguf": str(a), "context_size": 256}, {"name": "b", "gguf": str(b), "context_size": 256}],
        ram_gib=1.5 * need / 1024**3,
    )
    swaps = []
    try:
        first_token_seconds(swap_daemon.url, "a")
        for i in range(runs):
            swaps.append(first_token_seconds(swap_daemon.url, "b" if i % 2 == 0 else "a"))
    finally:
        swap_daemon.stop()

    raw_total = [r + t for r, t in zip(raw_ready, raw_token)]
    med = statistics.median
    ms = [v * 1000 for v in raw_ready]
    return {
        "raw_docker_run_to_health_ms": spread(ms, 1),
        "raw_first_token_after_health_ms": spread([v * 1000 for v in raw_token], 1),
        "raw_run_to_first_token_ms": spread([v * 1000 for v in raw_total], 1),
        "localllm_cold_request_to_first_token_ms": spread([v * 1000 for v in cold], 1),
        "localllm_swap_to_first_token_ms": spread([v * 1000 for v in swaps], 1),
        "ratio_cold_to_raw_health": round(med(cold) / med(raw_ready), 3),
        "ratio_cold_to_raw_first_token": round(med(cold) / med(raw_total), 3),
        "localllm_share_of_cold_ms": round((med(cold) - med(raw_total)) * 1000, 1),
        "localllm_share_of_swap_ms": round((med(swaps) - med(raw_total)) * 1000, 1),
        "cold_cost_over_container_ready_ms": round((med(cold) - med(raw_ready)) * 1000, 1),
    }


def render(result: dict) -> str:
    rows = [(k.removesuffix("_ms"), v) for k, v in result.items() if isinstance(v, dict)]
    lines = ["## Cold start and swap", "", "| measurement (ms) | min | median | max | runs |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['min']} | {v['median']} | {v['max']} | {v['runs']} |" for k, v in rows]
    over = result["cold_cost_over_container_ready_ms"]
    lines += [
        "",
        f"- cold request to first token / raw docker run to healthy (medians): {result['ratio_cold_to_raw_health']}",
        f"- cold request to first token / raw docker run to first token: {result['ratio_cold_to_raw_first_token']}",
        f"- localllm's own share of a cold request: {result['localllm_share_of_cold_ms']} ms; of a swap "
        f"(stop A, start B): {result['localllm_share_of_swap_ms']} ms",
        f"- target: a cold load costs at most 100 ms more than container-ready: {over} ms, "
        + ("met" if over <= 100 else f"missed by {over - 100:.1f} ms"),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="localllm-bench-") as tmp:
        print(render(run(Path(tmp), runs=args.runs)))
