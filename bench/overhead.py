"""The proxy's added latency: the same llama-server hit directly, through localllm, and through LiteLLM's proxy.

    .venv/bin/python bench/overhead.py [--quick]      (after: bash scripts/dev.sh setup)

One generated tiny model (fast upstream, so a proxy's cost shows) is served three ways,
and one client (aiohttp, in this process) drives all three alike:

- direct: a llama-server container (``bench.common.raw_llama_server``);
- localllm: a localllmd with the same model (preloaded), its own container with the same
  server arguments (``parallel``, and ``--threads`` through ``extra_args``), requests to its proxy;
- litellm: LiteLLM's proxy (its own venv, see ``bench/litellm_env.py``) whose one
  ``model_list`` entry points at the direct llama-server.

Latency phases are sequential requests, interleaved round-robin (the order rotating each
round) so that drift hits all three alike. Throughput runs are fixed-duration, per level
and target, interleaved and repeated. Added latency is (through X) - (direct), from
figures measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import docker
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import litellm_env  # noqa: E402
from bench.common import (  # noqa: E402
    Daemon,
    free_port,
    machine_facts,
    percentile,
    process_tree_usage,
    raw_llama_server,
    spread,
    summary_ms,
    wait_healthy,
)
from supervisor.runtime.tinygguf import write_tiny_model  # noqa: E402

MODEL = "tiny"
# As many slots as the highest concurrency: every request is decoded at once, in one batch, and gets
# an HTTP thread of its own. llama-server has parallel + 2 HTTP threads, and a keep-alive connection
# holds one for as long as it stays open, so with --parallel 4 a 64-client level measures which
# connections llama-server's thread pool starves (a trial run: a tenth of the requests/s, and failed
# requests), not the proxies. 64 slots of this model cost 2 MiB of KV cache.
PARALLEL = 64
# One compute thread per server: llama-server's threads poll while they wait, and on this 2-core machine two
# of them take both cores from whatever else runs, the proxies included. Both containers get the same.
THREADS = ("--threads", "1", "--threads-batch", "1")
CONTEXT = 64 * 128  # 128 tokens per slot: the 56-token chat prompt and 32 generated tokens fit
EXTRA_VOCAB = 2000  # whole-word tokens outnumber the 256 byte tokens, so nearly every token is one SSE event
MESSAGES = [{"role": "user", "content": "hi"}]
NONSTREAM = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1, "temperature": 0}
STREAM = {
    "model": MODEL,
    "messages": MESSAGES,
    "max_tokens": 32,
    "ignore_eos": True,
    "temperature": 0,
    "stream": True,
    "stream_options": {"include_usage": True},
}
LEVELS = (1, 16, 64)
HEADERS = {"Content-Type": "application/json"}
# llama-server closes the connection after a stream without saying so (no "Connection: close"), and
# reusing it fails the next request: so no target's connection is reused after a stream.
STREAM_HEADERS = {**HEADERS, "Connection": "close"}
COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')

FULL = {
    "warmup": 50,
    "latency_runs": 3,
    "latency_per_run": 200,
    "stream_runs": 3,
    "stream_per_run": 40,
    "throughput_runs": 5,
    "throughput_seconds": 2.5,
    "levels": LEVELS,
}
QUICK = {
    "warmup": 5,
    "latency_runs": 1,
    "latency_per_run": 20,
    "stream_runs": 1,
    "stream_per_run": 5,
    "throughput_runs": 1,
    "throughput_seconds": 0.3,
    "levels": LEVELS,
}

# Targets from issue #7 (reported as met or missed, never asserted).
ADDED_P50_LIMIT_MS = 1.0
ADDED_P99_LIMIT_MS = 5.0
LITELLM_RATIO_MIN = 5.0
STREAM_THROUGHPUT_RATIO_MIN = 0.9


# -- the client ---------------------------------------------------------------------------


class BadAnswer(RuntimeError):
    pass


async def nonstream_once(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[float, int]:
    """(seconds until the whole answer is read, completion tokens)."""
    started = time.perf_counter()
    async with session.post(url, data=body, headers=HEADERS) as response:
        data = await response.read()
    elapsed = time.perf_counter() - started
    if response.status != 200:
        raise BadAnswer(f"HTTP {response.status}: {data[:300]!r}")
    found = COMPLETION_TOKENS.search(data)
    return round(elapsed, 7), int(found.group(1)) if found else 0


async def stream_once(session: aiohttp.ClientSession, url: str, body: bytes) -> dict:
    """One streamed chat answer: total, first and last content event (seconds from the send), tokens, events."""
    started = time.perf_counter()
    first = last = None
    events, tokens = 0, 0
    async with session.post(url, data=body, headers=STREAM_HEADERS) as response:
        if response.status != 200:
            raise BadAnswer(f"HTTP {response.status}: {(await response.read())[:300]!r}")
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            if b'"content":"' in line and b'"content":""' not in line:
                now = time.perf_counter()
                first = first if first is not None else now
                last, events = now, events + 1
            elif b'"usage"' in line:
                found = COMPLETION_TOKENS.search(line)
                tokens = int(found.group(1)) if found else tokens
            elif line.startswith(b'data: {"error"'):
                raise BadAnswer(line[:300].decode(errors="replace"))
    total = time.perf_counter() - started
    if first is None:
        raise BadAnswer("stream ended without a content event")
    return {
        "total": round(total, 7),
        "ttft": round(first - started, 7),
        "last": round(last - started, 7),
        "tokens": tokens,
        "events": events,
    }


def token_gap(sample: dict) -> float | None:
    """Mean time between tokens after the first: (last content event - first) / (tokens - 1)."""
    tokens = sample["tokens"] or sample["events"]
    return (sample["last"] - sample["ttft"]) / (tokens - 1) if tokens > 1 else None


async def attempt(request, errors: dict, target: str):
    """The request's answer, or None with the failure counted (a failed request is no latency sample)."""
    try:
        return await request
    except (TimeoutError, BadAnswer, aiohttp.ClientError) as exc:
        errors.setdefault(target, []).append(f"{type(exc).__name__}: {exc}"[:200])
        return None


def rotated(targets: list[str], i: int) -> list[str]:
    k = i % len(targets)
    return targets[k:] + targets[:k]


async def latency_phase(sessions: dict, urls: dict, plan: dict, errors: dict) -> dict:
    """Sequential non-streaming max_tokens=1 requests, round-robin; samples per target and per run."""
    body = json.dumps(NONSTREAM).encode()
    targets = list(urls)
    runs: dict[str, list[list[float]]] = {t: [] for t in targets}
    for _ in range(plan["latency_runs"]):
        samples: dict[str, list[float]] = {t: [] for t in targets}
        for i in range(plan["latency_per_run"]):
            for target in rotated(targets, i):
                answer = await attempt(nonstream_once(sessions[target], urls[target], body), errors, target)
                if answer is not None:
                    samples[target].append(answer[0])
        for target in targets:
            runs[target].append(samples[target])
    return runs


async def stream_phase(sessions: dict, urls: dict, plan: dict, errors: dict) -> dict:
    """Sequential streamed max_tokens=32 (ignore_eos) requests, round-robin: first token and token gaps."""
    body = json.dumps(STREAM).encode()
    targets = list(urls)
    runs: dict[str, list[list[dict]]] = {t: [] for t in targets}
    for _ in range(plan["stream_runs"]):
        samples: dict[str, list[dict]] = {t: [] for t in targets}
        for i in range(plan["stream_per_run"]):
            for target in rotated(targets, i):
                answer = await attempt(stream_once(sessions[target], urls[target], body), errors, target)
                if answer is not None:
                    samples[target].append(answer)
        for target in targets:
            runs[target].append(samples[target])
    return runs


async def throughput_once(
    session: aiohttp.ClientSession,
    url: str,
    stream: bool,
    concurrency: int,
    seconds: float,
    pid: int | None,
    upstream_pid: int | None = None,
) -> dict:
    """``concurrency`` clients send back to back for ``seconds``; answers that end after the deadline count too.

    CPU seconds are counted for the proxy's process (``pid``) and the llama-server it reaches (``upstream_pid``).
    """
    body = json.dumps(STREAM if stream else NONSTREAM).encode()
    done, tokens, errors = 0, 0, []
    cpu_before = process_tree_usage(pid)[1] if pid else None
    upstream_before = process_tree_usage(upstream_pid)[1] if upstream_pid else None
    started = time.perf_counter()
    deadline = started + seconds

    async def client() -> None:
        nonlocal done, tokens
        while time.perf_counter() < deadline:
            try:  # (await first: "tokens += await ..." would read tokens before the await and lose updates)
                got = (
                    (await stream_once(session, url, body))["tokens"]
                    if stream
                    else (await nonstream_once(session, url, body))[1]
                )
            except (TimeoutError, BadAnswer, aiohttp.ClientError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            done, tokens = done + 1, tokens + got

    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    proxy_cpu = process_tree_usage(pid)[1] - cpu_before if pid else None
    upstream_cpu = process_tree_usage(upstream_pid)[1] - upstream_before if upstream_pid else None
    return {
        "requests": done,
        "tokens": tokens,
        "seconds": round(elapsed, 4),
        "rps": round(done / elapsed, 2),
        "tok_s": round(tokens / elapsed, 1),
        "errors": len(errors),
        "error_samples": errors[:3],
        "proxy_cpu_s": None if proxy_cpu is None else round(proxy_cpu, 3),
        "proxy_cpu_ms_per_request": None if proxy_cpu is None or not done else round(proxy_cpu / done * 1000, 3),
        "upstream_cpu_cores": None if upstream_cpu is None else round(upstream_cpu / elapsed, 2),
    }


async def throughput_phase(sessions: dict, urls: dict, pids: dict, upstream_pids: dict, plan: dict) -> dict:
    """{mode: {level: {target: [one dict per run]}}}; levels, targets and runs interleaved."""
    targets = list(urls)
    out = {mode: {str(c): {t: [] for t in targets} for c in plan["levels"]} for mode in ("stream", "nonstream")}
    for run in range(plan["throughput_runs"]):
        for mode in ("stream", "nonstream"):
            for level in plan["levels"]:
                for target in rotated(targets, run):
                    out[mode][str(level)][target].append(
                        await throughput_once(
                            sessions[target],
                            urls[target],
                            mode == "stream",
                            level,
                            plan["throughput_seconds"],
                            pids.get(target),
                            upstream_pids.get(target),
                        )
                    )
    return out


async def drive(urls: dict, pids: dict, upstream_pids: dict, plan: dict) -> dict:
    timeout = aiohttp.ClientTimeout(total=120)
    sessions = {t: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) for t in urls}
    try:
        warm_nonstream, warm_stream = json.dumps(NONSTREAM).encode(), json.dumps(STREAM).encode()
        warmup_errors: dict[str, list[str]] = {}
        for target, url in urls.items():
            for _ in range(plan["warmup"]):
                await attempt(nonstream_once(sessions[target], url, warm_nonstream), warmup_errors, target)
                await attempt(stream_once(sessions[target], url, warm_stream), warmup_errors, target)
        latency_errors: dict[str, list[str]] = {}
        latency = await latency_phase(sessions, urls, plan, latency_errors)
        stream_errors: dict[str, list[str]] = {}
        stream = await stream_phase(sessions, urls, plan, stream_errors)
        throughput = await throughput_phase(sessions, urls, pids, upstream_pids, plan)
    finally:
        for session in sessions.values():
            await session.close()
    errors = {
        phase: {t: {"count": len(e), "samples": e[:3]} for t, e in found.items()}
        for phase, found in (("warmup", warmup_errors), ("latency", latency_errors), ("stream", stream_errors))
    }
    return {"latency": latency, "stream": stream, "throughput": throughput, "errors": errors}


# -- the three targets --------------------------------------------------------------------


def _container_pid(engine, status: dict, model: str) -> int | None:
    """The host PID of the llama-server in localllm's container for ``model``."""
    short = next((m["container"] for m in status["models"] if m["name"] == model), None)
    if not short:
        return None
    return engine.containers.get(short).attrs["State"]["Pid"] or None


def server_slots(url: str) -> int | None:
    try:
        return requests.get(f"{url}/props", timeout=5).json().get("total_slots")
    except (requests.RequestException, ValueError):
        return None


def run(workdir: Path, quick: bool = False) -> dict:
    """Serve the model three ways, drive them alike, and return figures plus the raw samples."""
    plan = dict(QUICK if quick else FULL)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = write_tiny_model(workdir / f"{MODEL}.gguf", name=MODEL, extra_vocab=EXTRA_VOCAB)
    litellm_venv, litellm_note = None, None
    if quick and litellm_env.installed_version() != litellm_env.LITELLM_VERSION:
        litellm_note = f"skipped: quick mode does not install litellm {litellm_env.LITELLM_VERSION}"
    else:
        try:
            litellm_venv = litellm_env.ensure_installed()
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            litellm_note = f"skipped: could not install litellm {litellm_env.LITELLM_VERSION}: {exc}"
    engine = docker.from_env()
    container, daemon, litellm = None, None, None
    try:
        direct_port = free_port()
        container = raw_llama_server(engine, model, direct_port, parallel=PARALLEL, context=CONTEXT, extra_args=THREADS)
        direct_url = f"http://127.0.0.1:{direct_port}"
        wait_healthy(direct_url)
        daemon = Daemon(
            workdir,
            [
                {
                    "name": MODEL,
                    "gguf": str(model),
                    "context_size": CONTEXT,
                    "preload": True,
                    "parallel": PARALLEL,
                    "extra_args": [*THREADS],
                }
            ],
        )
        daemon.wait_state(MODEL, "ready")
        localllm_port = next(m["port"] for m in daemon.status()["models"] if m["name"] == MODEL)
        urls = {"direct": f"{direct_url}/v1/chat/completions", "localllm": f"{daemon.url}/v1/chat/completions"}
        pids = {"localllm": daemon.pid}
        container.reload()
        upstream_pids = {
            "direct": container.attrs["State"]["Pid"],
            "localllm": _container_pid(engine, daemon.status(), MODEL),
        }
        litellm_facts: dict = {"version": litellm_env.LITELLM_VERSION, "note": litellm_note}
        if litellm_venv is not None:
            litellm = litellm_env.LiteLLMProxy(workdir, litellm_venv, MODEL, direct_url, free_port())
            try:
                litellm_facts.update(ready_s=round(litellm.wait_ready(), 2))
            except RuntimeError as exc:
                litellm_facts["note"] = f"skipped: LiteLLM did not start: {exc}"
                litellm.stop()
                litellm = None
        if litellm is not None:
            litellm_facts.update(
                command=litellm.command,
                config=litellm_env.config(MODEL, direct_url),
                env=litellm_env.QUIET_ENV,
                packages=litellm_env.package_versions(litellm_venv),
            )
            urls["litellm"] = f"{litellm.url}/v1/chat/completions"
            pids["litellm"] = litellm.pid
            upstream_pids["litellm"] = upstream_pids["direct"]
        slots = {"direct": server_slots(direct_url), "localllm": server_slots(f"http://127.0.0.1:{localllm_port}")}
        started = time.perf_counter()
        raw = asyncio.run(drive(urls, pids, upstream_pids, plan))
        seconds = time.perf_counter() - started
    finally:
        if litellm is not None:
            litellm.stop()
        if daemon is not None:
            daemon.stop()
        if container is not None:
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
        engine.close()
    result = {
        "machine": machine_facts(),
        "setup": {
            "model": MODEL,
            "extra_vocab": EXTRA_VOCAB,
            "parallel": PARALLEL,
            "context": CONTEXT,
            "slots_seen": slots,
            "nonstream_request": NONSTREAM,
            "stream_request": STREAM,
            "plan": plan,
            "quick": quick,
            "client": f"aiohttp {aiohttp.__version__}, one session per target, "
            "in the benchmark process (it shares the cores with the servers)",
            "litellm": litellm_facts,
            "targets": list(urls),
            "drive_seconds": round(seconds, 1),
        },
        "raw": raw,
    }
    result.update(figures(raw, list(urls)))
    return result


# -- figures ------------------------------------------------------------------------------


def figures(raw: dict, targets: list[str]) -> dict:
    latency, stream, throughput = {}, {}, {}
    for t in targets:
        runs = raw["latency"][t]
        pooled = [s for run in runs for s in run]
        if not pooled or not any(raw["stream"][t]) or not all(runs):
            raise RuntimeError(f"{t} answered too few requests to measure: {raw['errors']}")
        latency[t] = {
            **summary_ms(pooled),
            "run_p50_ms": spread([percentile(r, 50) * 1000 for r in runs]),
            "run_p99_ms": spread([percentile(r, 99) * 1000 for r in runs]),
        }
        samples = [s for run in raw["stream"][t] for s in run]
        gaps = [g for g in (token_gap(s) for s in samples) if g is not None]
        stream[t] = {
            "ttft": summary_ms([s["ttft"] for s in samples]),
            "token_gap": summary_ms(gaps),
            "total": summary_ms([s["total"] for s in samples]),
            "tokens": spread([s["tokens"] for s in samples], 0),
            "content_events": spread([s["events"] for s in samples], 0),
            "run_ttft_p50_ms": spread([percentile([s["ttft"] for s in r], 50) * 1000 for r in raw["stream"][t]]),
        }
    for mode, levels in raw["throughput"].items():
        throughput[mode] = {}
        for level, per_target in levels.items():
            throughput[mode][level] = {}
            for t in targets:
                runs = per_target[t]
                cpu = [r["proxy_cpu_ms_per_request"] for r in runs if r["proxy_cpu_ms_per_request"] is not None]
                upstream = [r["upstream_cpu_cores"] for r in runs if r.get("upstream_cpu_cores") is not None]
                throughput[mode][level][t] = {
                    "rps": spread([r["rps"] for r in runs], 1),
                    "tok_s": spread([r["tok_s"] for r in runs], 1),
                    "errors": sum(r["errors"] for r in runs),
                    "proxy_cpu_ms_per_request": spread(cpu) if cpu else None,
                    "upstream_cpu_cores": spread(upstream, 2) if upstream else None,
                }
    added = {}
    for proxy in [t for t in targets if t != "direct"]:
        paired = [x - d for rx, rd in zip(raw["latency"][proxy], raw["latency"]["direct"]) for x, d in zip(rx, rd)]
        added[proxy] = {
            "p50_ms": round(latency[proxy]["p50_ms"] - latency["direct"]["p50_ms"], 3),
            "p99_ms": round(latency[proxy]["p99_ms"] - latency["direct"]["p99_ms"], 3),
            "run_p50_ms": spread(
                [p - d for p, d in zip(_run_p50s(raw["latency"][proxy]), _run_p50s(raw["latency"]["direct"]))]
            ),
            "paired_median_ms": round(statistics.median(paired) * 1000, 3),
            "ttft_p50_ms": round(stream[proxy]["ttft"]["p50_ms"] - stream["direct"]["ttft"]["p50_ms"], 3),
            "token_gap_p50_ms": round(
                stream[proxy]["token_gap"]["p50_ms"] - stream["direct"]["token_gap"]["p50_ms"], 3
            ),
        }
    ratios = {}
    if "litellm" in added:
        for key in ("p50_ms", "p99_ms", "paired_median_ms", "ttft_p50_ms"):
            mine, theirs = added["localllm"][key], added["litellm"][key]
            ratios[f"litellm_over_localllm_{key.removesuffix('_ms')}"] = round(theirs / mine, 2) if mine > 0 else None
    for mode in throughput:
        for level in throughput[mode]:
            row = throughput[mode][level]
            for proxy in [t for t in targets if t != "direct"]:
                for what in ("rps", "tok_s"):
                    direct = row["direct"][what]["median"]
                    ratios[f"{mode}_c{level}_{what}_{proxy}_over_direct"] = (
                        round(row[proxy][what]["median"] / direct, 3) if direct else None
                    )
    return {
        "latency": latency,
        "stream": stream,
        "throughput": throughput,
        "added": added,
        "ratios": ratios,
        "targets_check": check_targets(added, ratios, str(max(LEVELS))),
    }


def _run_p50s(runs: list[list[float]]) -> list[float]:
    return [percentile(r, 50) * 1000 for r in runs]


def check_targets(added: dict, ratios: dict, top: str) -> list[dict]:
    mine = added["localllm"]
    checks = [
        {
            "target": f"localllm adds <= {ADDED_P50_LIMIT_MS:g} ms at p50 (non-streaming)",
            "value": mine["p50_ms"],
            "limit": ADDED_P50_LIMIT_MS,
            "met": mine["p50_ms"] <= ADDED_P50_LIMIT_MS,
            "margin": round(ADDED_P50_LIMIT_MS - mine["p50_ms"], 3),
            "unit": "ms",
        },
        {
            "target": f"localllm adds <= {ADDED_P99_LIMIT_MS:g} ms at p99 (non-streaming)",
            "value": mine["p99_ms"],
            "limit": ADDED_P99_LIMIT_MS,
            "met": mine["p99_ms"] <= ADDED_P99_LIMIT_MS,
            "margin": round(ADDED_P99_LIMIT_MS - mine["p99_ms"], 3),
            "unit": "ms",
        },
    ]
    ratio = ratios.get("litellm_over_localllm_p50")
    if "litellm" in added:
        theirs = added["litellm"]["p50_ms"]
        met = ratio is not None and ratio >= LITELLM_RATIO_MIN or (ratio is None and theirs > 0)
        checks.append(
            {
                "target": f"localllm's added p50 >= {LITELLM_RATIO_MIN:g}x lower than LiteLLM's",
                "value": ratio,
                "limit": LITELLM_RATIO_MIN,
                "met": met,
                "margin": None if ratio is None else round(ratio - LITELLM_RATIO_MIN, 2),
                "unit": "x",
            }
        )
    stream_ratio = ratios.get(f"stream_c{top}_tok_s_localllm_over_direct")
    checks.append(
        {
            "target": f"streaming tokens/s through localllm >= {STREAM_THROUGHPUT_RATIO_MIN:g}x direct "
            f"at concurrency {top}",
            "value": stream_ratio,
            "limit": STREAM_THROUGHPUT_RATIO_MIN,
            "met": stream_ratio is not None and stream_ratio >= STREAM_THROUGHPUT_RATIO_MIN,
            "margin": None if stream_ratio is None else round(stream_ratio - STREAM_THROUGHPUT_RATIO_MIN, 3),
            "unit": "x",
        }
    )
    return checks


# -- the report ---------------------------------------------------------------------------


def render(result: dict) -> str:
    setup, targets = result["setup"], result["setup"]["targets"]
    plan, litellm = setup["plan"], setup["litellm"]
    lines = [
        "## Proxy overhead: direct llama-server, through localllm, through LiteLLM",
        "",
        f"Command: `.venv/bin/python bench/overhead.py{' --quick' if setup['quick'] else ''}`. "
        f"One generated tiny model (vocabulary +{setup['extra_vocab']} words), llama-server "
        f"`--parallel {setup['parallel']} -c {setup['context']} --threads 1` for both containers (slots seen: "
        f"{setup['slots_seen']}); LiteLLM points at the direct container. Client: {setup['client']}.",
        "",
    ]
    if "litellm" in targets:
        lines += [
            f"LiteLLM {litellm['version']} (packages: {_packages(litellm.get('packages'))}), "
            f"`litellm --config ... --host 127.0.0.1 --port P --num_workers 1 --telemetry False`, "
            "no database, no master key, no callbacks, model cost map from the package.",
            "",
        ]
    else:
        lines += [f"LiteLLM: {litellm.get('note')}.", ""]
    lines += [
        f"### Non-streaming latency, `max_tokens: 1` ({plan['latency_runs']} runs x "
        f"{plan['latency_per_run']} sequential requests per target, round-robin)",
        "",
        "| target | p50 ms | p99 ms | min ms | max ms | mean ms | per-run p50 ms (min / median / max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in targets:
        s = result["latency"][t]
        lines.append(
            f"| {t} | {s['p50_ms']} | {s['p99_ms']} | {s['min_ms']} | {s['max_ms']} | {s['mean_ms']} | "
            f"{_spread(s['run_p50_ms'])} |"
        )
    lines += [
        "",
        f"### Streaming, `max_tokens: 32`, `ignore_eos` ({plan['stream_runs']} runs x "
        f"{plan['stream_per_run']} sequential requests per target, round-robin)",
        "",
        "| target | first token p50 ms | first token p99 ms | token gap p50 ms | token gap p99 ms | "
        "whole answer p50 ms |",
        "|---|---|---|---|---|---|",
    ]
    for t in targets:
        s = result["stream"][t]
        lines.append(
            f"| {t} | {s['ttft']['p50_ms']} | {s['ttft']['p99_ms']} | {s['token_gap']['p50_ms']} | "
            f"{s['token_gap']['p99_ms']} | {s['total']['p50_ms']} |"
        )
    lines += [
        "",
        "Token gap: (last content event - first) / (completion tokens - 1), per answer. Streamed requests "
        "carry `Connection: close` to every target: llama-server closes its connection after a stream "
        "without announcing it, so a reused connection would fail.",
        "",
    ]
    for mode, title in (("stream", "streaming `max_tokens: 32`"), ("nonstream", "non-streaming `max_tokens: 1`")):
        lines += [
            f"### Throughput, {title} ({plan['throughput_runs']} runs x {plan['throughput_seconds']} s per "
            "level and target; min / median / max)",
            "",
            "| concurrency | target | requests/s | tokens/s | proxy CPU ms per request | llama-server cores busy "
            "| errors |",
            "|---|---|---|---|---|---|---|",
        ]
        for level, row in result["throughput"][mode].items():
            for t in targets:
                s = row[t]
                lines.append(
                    f"| {level} | {t} | {_spread(s['rps'])} | {_spread(s['tok_s'])} | "
                    f"{_spread(s['proxy_cpu_ms_per_request'])} | {_spread(s.get('upstream_cpu_cores'))} | "
                    f"{s['errors']} |"
                )
        lines.append("")
    lines += [
        "Proxy CPU: the proxy process's user+system CPU over the window divided by the requests answered "
        "(psutil, 10 ms clock ticks). llama-server cores busy: CPU of the llama-server the target reaches, "
        "per second of the window; its compute threads poll while waiting, so it takes most of the two cores "
        "even at concurrency 1, and every proxy and the client compete with it.",
        "",
        "### Added latency (through X - direct, same run)",
        "",
        "| proxy | p50 ms | p99 ms | per-run p50 ms (min / median / max) | median of paired differences ms | "
        "first token p50 ms | token gap p50 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for proxy, a in result["added"].items():
        lines.append(
            f"| {proxy} | {a['p50_ms']} | {a['p99_ms']} | {_spread(a['run_p50_ms'])} | "
            f"{a['paired_median_ms']} | {a['ttft_p50_ms']} | {a['token_gap_p50_ms']} |"
        )
    ratios = result["ratios"]
    lines += ["", "Ratios (same run):", ""]
    if "litellm" in targets:
        lines += [
            f"- LiteLLM-added / localllm-added: p50 {_x(ratios.get('litellm_over_localllm_p50'))}, "
            f"p99 {_x(ratios.get('litellm_over_localllm_p99'))}, paired median "
            f"{_x(ratios.get('litellm_over_localllm_paired_median'))}, first token "
            f"{_x(ratios.get('litellm_over_localllm_ttft_p50'))}"
        ]
    for mode in ("stream", "nonstream"):
        for level in result["throughput"][mode]:
            parts = [
                f"{proxy} {ratios.get(f'{mode}_c{level}_tok_s_{proxy}_over_direct')} (tokens/s), "
                f"{ratios.get(f'{mode}_c{level}_rps_{proxy}_over_direct')} (requests/s)"
                for proxy in targets
                if proxy != "direct"
            ]
            lines.append(f"- {mode}, concurrency {level}, X / direct: " + "; ".join(parts))
    lines += ["", "### Targets (issue #7)", "", "| target | measured | met | margin |", "|---|---|---|---|"]
    for c in result["targets_check"]:
        value = "-" if c["value"] is None else f"{c['value']} {c['unit']}"
        margin = "-" if c["margin"] is None else f"{c['margin']:+} {c['unit']}"
        lines.append(f"| {c['target']} | {value} | {'met' if c['met'] else 'MISSED'} | {margin} |")
    failed = [
        f"{phase}: {target} {e['count']} ({'; '.join(e['samples'])})"
        for phase, found in result["raw"]["errors"].items()
        for target, e in found.items()
    ]
    lines += ["", "Failed requests (left out of the figures): " + ("; ".join(failed) if failed else "none") + ".", ""]
    return "\n".join(lines)


def _spread(s: dict | None) -> str:
    return "-" if not s else f"{s['min']} / {s['median']} / {s['max']}"


def _x(ratio: float | None) -> str:
    return "n/a (localllm added <= 0)" if ratio is None else f"{ratio}x"


def _packages(packages: dict | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (packages or {}).items() if v) or "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run")
    parser.add_argument("--json", type=Path, help="also write the whole result (raw samples included) here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="localllm-overhead-") as tmp:
        result = run(Path(tmp), quick=args.quick)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))
    print(f"Machine: {result['machine']}")


if __name__ == "__main__":
    main()
