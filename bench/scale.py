"""Footprint, scale and recovery of localllmd (issue #7, items 3, 4 and 5).

    .venv/bin/python bench/scale.py [--quick]      (after: bash scripts/dev.sh setup)

Prints a Markdown section. All models are generated tiny GGUF files (random
weights, different seeds), so the figures are the daemon's own costs, not a
model's.

- footprint: localllmd's RSS and CPU (CPU seconds per wall second) idle with a
  catalog of 50 models, none loaded; then under load: 16 concurrent
  non-streaming ``max_tokens: 1`` chats to one loaded model.
- scale: 1,000 idle SSE connections held through the proxy (a model whose
  server binds 127.0.0.2, so its health check on 127.0.0.1 never answers: the
  requests wait, and get keep-alive comments every 5 s); 200 concurrent streams
  to one loaded model (also sent straight to its llama-server, same run);
  ``localllmctl status --json`` and the control API's ``/status`` with 20
  running containers. Also (full run): 1,100 waiting streams against a daemon
  whose soft RLIMIT_NOFILE is 1024, systemd's default for a service.
- recovery: with those 20 containers running, kill -9 the daemon, start it
  again with ``$NOTIFY_SOCKET`` on a datagram socket of ours, and time process
  start to ``READY=1``; then check every container was adopted (same ids).

One figure per run: min / median / max over the runs; distributions: p50 / p99.
The client runs in this process, on the same cores as the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    BIN,
    Daemon,
    machine_facts,
    process_tree_usage,
    remove_bench_containers,
    spread,
    summary_ms,
)
from supervisor.runtime.tinygguf import write_tiny_model  # noqa: E402

MB = 1_000_000
RSS_IDLE_TARGET_MB = 80
RECOVERY_TARGET_S = 2.0
KEEPALIVE_S = 5.0  # supervisor.api.proxy.KEEPALIVE_SECONDS
SYSTEMD_DEFAULT_NOFILE = 1024  # systemd's DefaultLimitNOFILE soft limit for services (hard: 524288)
PORT_RANGE = "28600-28699"  # away from the default range, which other daemons on the host use

FULL = {
    "catalog": 50,
    "connections": 1000,
    "streams": 200,
    "containers": 20,
    "recoveries": 5,
    "status_runs": 20,
    "window_s": 10.0,
    "hold_s": 12.0,
    "concurrency": 16,
    "stream_rounds": 2,
    "soft_limit_check": True,
    "soft_limit_connections": 1100,
}
QUICK = {
    "catalog": 10,
    "connections": 50,
    "streams": 20,
    "containers": 3,
    "recoveries": 1,
    "status_runs": 3,
    "window_s": 2.0,
    "hold_s": 6.0,
    "concurrency": 4,
    "stream_rounds": 1,
    "soft_limit_check": False,
    "soft_limit_connections": 0,
}


def chat(model: str, stream: bool, max_tokens: int) -> dict:
    return {"model": model, "stream": stream, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}


# --- the control API over its unix socket, without the CLI --------------------------------------------------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float = 30):
        super().__init__("localllmd", timeout=timeout)
        self.unix_path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def control_get(sock: Path, path: str, timeout: float = 30) -> tuple[int, bytes]:
    connection = _UnixConnection(sock, timeout)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def control_status(sock: Path) -> dict:
    status, body = control_get(sock, "/status")
    if status != 200:
        raise RuntimeError(f"/status answered {status}: {body[:300]!r}")
    return json.loads(body)


def control_events(sock: Path) -> list[dict]:
    _, body = control_get(sock, "/events?limit=1000")
    return [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]


def model_view(sock: Path, name: str) -> dict:
    return next(m for m in control_status(sock)["models"] if m["name"] == name)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> float:
    started = time.perf_counter()
    while not predicate():
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)
    return time.perf_counter() - started


def all_ready(sock: Path, names: list[str]) -> bool:
    states = {m["name"]: m["state"] for m in control_status(sock)["models"]}
    failed = [n for n in names if states.get(n) == "failed"]
    if failed:
        raise RuntimeError(f"models failed to start: {failed}")
    return all(states.get(n) == "ready" for n in names)


# --- usage of the daemon process ------------------------------------------------------------------------------------


def usage_window(pid: int, seconds: float) -> dict:
    """The daemon's CPU seconds per wall second over ``seconds``, and its RSS at the end."""
    _, cpu0 = process_tree_usage(pid)
    t0 = time.perf_counter()
    time.sleep(seconds)
    rss, cpu1 = process_tree_usage(pid)
    wall = time.perf_counter() - t0
    return {"rss_mb": round(rss / MB, 1), "cpu_per_s": round((cpu1 - cpu0) / wall, 4), "wall_s": round(wall, 2)}


def nofile(pid: int) -> tuple[int, int]:
    return psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)


def raise_own_nofile(needed: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to at least ``needed`` (children inherit it); returns the old one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return soft, hard


# --- load generators (aiohttp, in this process) ---------------------------------------------------------------------


async def closed_loop(url: str, model: str, concurrency: int, seconds: float, pid: int) -> dict:
    """``concurrency`` workers sending non-streaming max_tokens 1 chats back to back for ``seconds``."""
    latencies: list[float] = []
    errors: list[str] = []
    body = chat(model, False, 1)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
    ) as session:

        async def one() -> None:
            t0 = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/chat/completions", json=body) as r:
                    data = await r.read()
                    if r.status != 200:
                        errors.append(f"HTTP {r.status}: {data[:200]!r}")
                        return
            except (TimeoutError, aiohttp.ClientError) as exc:
                errors.append(repr(exc))
                return
            latencies.append(time.perf_counter() - t0)

        for _ in range(concurrency):  # warm the connections and the model
            await one()
        latencies.clear()

        async def worker(deadline: float) -> None:
            while time.perf_counter() < deadline:
                await one()

        _, cpu0 = process_tree_usage(pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(t0 + seconds) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        rss, cpu1 = process_tree_usage(pid)
    return {
        "rss_mb": round(rss / MB, 1),
        "cpu_per_s": round((cpu1 - cpu0) / wall, 4),
        "wall_s": round(wall, 2),
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:3],
        "requests_per_s": round(len(latencies) / wall, 1),
        "latency": summary_ms(latencies) if latencies else None,
    }


async def max_fds(pid: int, stop: asyncio.Event) -> int:
    """The most file descriptors ``pid`` had open, sampled every 50 ms until ``stop``."""
    most = 0
    process = psutil.Process(pid)
    while not stop.is_set():
        most = max(most, await asyncio.to_thread(process.num_fds))
        await asyncio.sleep(0.05)
    return most


async def concurrent_streams(base: str, model: str, count: int, max_tokens: int, pid: int | None = None) -> dict:
    """``count`` streaming chats at once; each is timed to its first token and checked to end with [DONE].

    With ``pid``, the most file descriptors that process had open meanwhile is sampled too.
    """
    ttft: list[float] = []
    totals: list[float] = []
    errors: list[str] = []
    body = chat(model, True, max_tokens)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one() -> None:
            t0 = time.perf_counter()
            first = None
            done = False
            try:
                async with session.post(f"{base}/v1/chat/completions", json=body) as r:
                    if r.status != 200:
                        errors.append(f"HTTP {r.status}: {(await r.read())[:200]!r}")
                        return
                    async for line in r.content:
                        if line.startswith(b"data: [DONE]"):
                            done = True
                        elif line.startswith(b"data: {"):
                            event = json.loads(line[6:])
                            if "error" in event:
                                errors.append(f"error event: {line[:200]!r}")
                                return
                            delta = (event.get("choices") or [{}])[0].get("delta") or {}
                            if first is None and delta.get("content"):
                                first = time.perf_counter() - t0
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                errors.append(repr(exc))
                return
            if not done:
                errors.append("stream ended without [DONE]")
                return
            totals.append(time.perf_counter() - t0)
            ttft.append(first if first is not None else totals[-1])

        stop = asyncio.Event()
        sampler = asyncio.create_task(max_fds(pid, stop)) if pid else None
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(count)))
        wall = time.perf_counter() - t0
        stop.set()
        fds = await sampler if sampler else None
    return {
        "streams": count,
        "daemon_max_fds": fds,
        "max_tokens": max_tokens,
        "completed": len(totals),
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": round(wall, 3),
        "ttft": summary_ms(ttft) if ttft else None,
        "duration": summary_ms(totals) if totals else None,
    }


@dataclass
class Held:
    status: int | None = None
    headers_at: float | None = None
    comments: list[float] = field(default_factory=list)  # arrival times of SSE comment lines
    data_lines: list[bytes] = field(default_factory=list)
    error: str | None = None


async def hold_connections(
    url: str, model: str, count: int, hold_s: float, pid: int, sock: Path, connect_within: float = 60.0
) -> dict:
    """Open ``count`` streaming chats to a model that never gets ready; hold them ``hold_s`` once all are open."""
    held = [Held() for _ in range(count)]
    body = chat(model, True, 8)

    async def one(h: Held, session: aiohttp.ClientSession) -> None:
        t0 = time.perf_counter()
        try:
            async with session.post(f"{url}/v1/chat/completions", json=body) as r:
                h.status, h.headers_at = r.status, time.perf_counter() - t0
                if r.status != 200 or "event-stream" not in r.headers.get("Content-Type", ""):
                    h.error = f"HTTP {r.status} {r.headers.get('Content-Type')}: {(await r.read())[:200]!r}"
                    return
                async for line in r.content:
                    if line.startswith(b":"):
                        h.comments.append(time.perf_counter())
                    elif line.strip():
                        h.data_lines.append(line)  # an error event: the wait failed
                h.error = f"stream ended while waiting: {b''.join(h.data_lines)[:200]!r}"
        except asyncio.CancelledError:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            h.error = repr(exc)

    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_within, sock_read=None)
    result: dict = {"connections": count}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(one(h, session)) for h in held]
        deadline = t0 + connect_within
        while time.perf_counter() < deadline:
            if all(h.headers_at is not None or h.error for h in held):
                break
            await asyncio.sleep(0.05)
        opened = [h.headers_at for h in held if h.headers_at is not None]
        result["all_headers_s"] = round(max(opened), 3) if len(opened) == count else None
        result["headers"] = summary_ms(opened) if opened else None
        result["with_headers"] = len(opened)
        fds = await asyncio.to_thread(psutil.Process(pid).num_fds)
        result["daemon_fds_open_after_connect"] = fds
        _, cpu0 = process_tree_usage(pid)
        h0 = time.perf_counter()
        control: list[str] = []
        problems: set[str] = set()
        while time.perf_counter() - h0 < hold_s:  # the control API must answer while the proxy holds them
            try:
                code, body = await asyncio.to_thread(control_get, sock, "/health", 5)
                control.append(str(code))
                if code != 200:
                    problems.update(json.loads(body).get("problems", []))
            except OSError:
                control.append("unreachable")
            await asyncio.sleep(1.0)
        hold_wall = time.perf_counter() - h0
        rss, cpu1 = process_tree_usage(pid)
        result["while_holding"] = {
            "rss_mb": round(rss / MB, 1),
            "cpu_per_s": round((cpu1 - cpu0) / hold_wall, 4),
            "wall_s": round(hold_wall, 2),
            "fds_open": await asyncio.to_thread(psutil.Process(pid).num_fds),
        }
        result["control_health_during_hold"] = ", ".join(
            f"{answer} × {control.count(answer)}" for answer in sorted(set(control))
        )
        result["control_problems_during_hold"] = sorted(problems)
        try:
            waiting = (await asyncio.to_thread(model_view, sock, model))["waiting"]
        except OSError as exc:  # the control API did not answer (file descriptors ran out, say)
            waiting = f"no answer from /status: {exc!r}"
        result["waiting_while_holding"] = waiting
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # each connection: its first comment at once, then one per KEEPALIVE_S; so at least 1 + hold_s // 5
    wanted = 1 + int(hold_s // KEEPALIVE_S)
    gaps = [b - a for h in held for a, b in zip(h.comments, h.comments[1:])]
    result["keepalives_wanted_each"] = wanted
    result["with_enough_keepalives"] = sum(len(h.comments) >= wanted for h in held)
    result["keepalive_gap"] = summary_ms(gaps) if gaps else None
    errors = [h.error for h in held if h.error]
    result["errors"] = len(errors)
    result["error_samples"] = sorted(set(errors))[:3]
    result["ok"] = (
        len(opened) == count and not errors and result["with_enough_keepalives"] == count and waiting == count
    )
    return result


def after_close(sock: Path, url: str, hang: str, probe_model: str | None) -> dict:
    """The queue empties once the clients left, and the daemon still serves."""
    drained = wait_until(lambda: model_view(sock, hang)["waiting"] == 0, 60, "queue empties", 0.02)
    health, body = control_get(sock, "/health")
    out = {
        "queue_empty_after_close_s": round(drained, 3),
        "control_health": health,
        "control_problems": json.loads(body).get("problems", []),
    }
    if probe_model:
        r = requests.post(f"{url}/v1/chat/completions", json=chat(probe_model, False, 1), timeout=120)
        out["chat_after"] = r.status_code
    out["healthy"] = health == 200 and out.get("chat_after", 200) == 200
    return out


# --- the phases -----------------------------------------------------------------------------------------------------


def make_models(workdir: Path, count: int, prefix: str) -> list[Path]:
    return [
        write_tiny_model(workdir / "models" / f"{prefix}{i:03d}.gguf", seed=1000 + i, name=f"{prefix}{i:03d}")
        for i in range(count)
    ]


def entry(name: str, gguf: Path, **extra) -> dict:
    return {"name": name, "gguf": str(gguf), "context_size": 256, **extra}


def hang_entry(gguf: Path) -> dict:
    """A model whose server listens on 127.0.0.2: its health check on 127.0.0.1 never answers, so it never loads."""
    return entry("hang", gguf, extra_args=["--host", "127.0.0.2"], startup_timeout="30m")


def footprint_and_scale(workdir: Path, sizes: dict, out: dict) -> None:
    """One daemon, a catalog of ``catalog`` models (one of them never loads): idle, load, 200 streams, 1,000 waits."""
    paths = make_models(workdir, sizes["catalog"], "m")
    models = [entry(f"m{i:03d}", p, ttl="0") for i, p in enumerate(paths[:-1])] + [hang_entry(paths[-1])]
    daemon = Daemon(workdir, models, max_queue=sizes["connections"] + 100, port_range=PORT_RANGE)
    out["catalog"] = len(models)
    try:
        pid = daemon.pid
        out["daemon_nofile"] = list(nofile(pid))
        time.sleep(2)  # let start-up settle
        out["idle"] = usage_window(pid, sizes["window_s"])
        out["idle"]["fds_open"] = psutil.Process(pid).num_fds()
        out["status_api_idle"] = status_api_latency(daemon.socket, sizes["status_runs"])

        daemon.ctl("load", "m000")
        out["under_load"] = asyncio.run(closed_loop(daemon.url, "m000", sizes["concurrency"], sizes["window_s"], pid))

        out["streams"] = streams_proxy_and_direct(daemon, sizes)

        held = asyncio.run(
            hold_connections(daemon.url, "hang", sizes["connections"], sizes["hold_s"], pid, daemon.socket)
        )
        held.update(after_close(daemon.socket, daemon.url, "hang", "m000"))
        held["rss_mb_after_close"] = round(process_tree_usage(pid)[0] / MB, 1)
        out["idle_connections"] = held
    finally:
        daemon.stop()


def streams_proxy_and_direct(daemon: Daemon, sizes: dict) -> dict:
    """``streams`` concurrent streams through the proxy and straight to the model's llama-server, in ABBA order."""
    order = ["proxy", "direct", "direct", "proxy"][: 2 * sizes["stream_rounds"]]
    runs = []
    for path in order:
        wait_until(lambda: model_view(daemon.socket, "m000")["state"] == "ready", 120, "m000 ready")
        view = model_view(daemon.socket, "m000")
        seen = max((e["id"] for e in control_events(daemon.socket)), default=0)
        base = daemon.url if path == "proxy" else f"http://127.0.0.1:{view['port']}"
        pid = daemon.pid if path == "proxy" else None
        run = asyncio.run(concurrent_streams(base, "m000", sizes["streams"], 16, pid))
        # what the daemon did to the model meanwhile: a failed liveness probe, a restart
        faults = [
            f"{e['kind']}: {e['message']}"
            for e in control_events(daemon.socket)
            if e["id"] > seen and e["kind"] in ("health_failure", "crash", "restart", "load_failed")
        ]
        runs.append({"path": path, **run, "model_faults": faults})
    out: dict = {"runs": runs}
    by = {p: [r for r in runs if r["path"] == p] for p in ("proxy", "direct")}
    if all(r["ttft"] for r in runs):

        def med(path: str, key: str) -> float:
            return statistics.median(r["wall_s"] if key == "wall" else r["ttft"]["p50_ms"] for r in by[path])

        out["median_wall_s"] = {p: round(med(p, "wall"), 3) for p in by}
        out["median_ttft_p50_ms"] = {p: round(med(p, "ttft"), 1) for p in by}
        out["wall_ratio_proxy_to_direct"] = round(med("proxy", "wall") / med("direct", "wall"), 3)
        out["ttft_p50_ratio_proxy_to_direct"] = round(med("proxy", "ttft") / med("direct", "ttft"), 3)
    return out


def soft_limit_check(workdir: Path, sizes: dict, out: dict) -> None:
    """Waiting streams beyond systemd's default soft RLIMIT_NOFILE (1024), against a daemon started with it."""
    path = make_models(workdir, 1, "s")[0]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (SYSTEMD_DEFAULT_NOFILE, hard))  # the child inherits it
    try:
        daemon = Daemon(
            workdir, [hang_entry(path)], max_queue=sizes["soft_limit_connections"] + 100, port_range=PORT_RANGE
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        out["daemon_nofile"] = list(nofile(daemon.pid))
        out.update(
            asyncio.run(
                hold_connections(
                    daemon.url,
                    "hang",
                    sizes["soft_limit_connections"],
                    sizes["hold_s"],
                    daemon.pid,
                    daemon.socket,
                    connect_within=20,
                )
            )
        )
        try:
            out.update(after_close(daemon.socket, daemon.url, "hang", None))
        except (RuntimeError, OSError) as exc:
            out["after_close_problem"] = str(exc)
        log = daemon.log_path.read_text(errors="replace")
        out["log_too_many_open_files"] = log.count("Too many open files")
    finally:
        daemon.stop()


def status_api_latency(sock: Path, runs: int) -> dict:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        status, _ = control_get(sock, "/status")
        times.append(time.perf_counter() - t0)
        assert status == 200
    return spread([t * 1000 for t in times], 2) | {"unit": "ms"}


def cli_status_latency(daemon: Daemon, runs: int) -> dict:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(
            [str(BIN / "localllmctl"), "--socket", str(daemon.socket), "status", "--json"],
            capture_output=True,
            check=True,
            timeout=60,
        )
        times.append(time.perf_counter() - t0)
    return spread([t * 1000 for t in times], 1) | {"unit": "ms"}


def python_import_cost(runs: int) -> dict:
    """Python start plus ``import supervisor.daemon``, the floor under a daemon's time to READY."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import supervisor.daemon"], check=True, cwd=str(BIN.parent.parent))
        times.append(time.perf_counter() - t0)
    return spread(times, 3) | {"unit": "s"}


def restart_with_notify(daemon: Daemon, workdir: Path) -> dict:
    """Start ``daemon`` again with $NOTIFY_SOCKET on a socket of ours; time process start to READY=1."""
    path = workdir / "notify.sock"
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(0.1)
    try:
        with daemon.log_path.open("a") as log:
            wall0, t0 = time.time(), time.perf_counter()
            daemon.process = subprocess.Popen(
                [str(BIN / "localllmd"), "--config", str(daemon.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "NOTIFY_SOCKET": str(path)},
            )
        while True:
            if time.perf_counter() - t0 > 120:
                raise RuntimeError("no READY=1 within 120 s")
            if daemon.process.poll() is not None:
                raise RuntimeError(f"localllmd exited: {daemon.log_path.read_text()[-2000:]}")
            try:
                message = listener.recv(4096).decode()
            except TimeoutError:
                continue
            if "READY=1" in message.splitlines():
                ready = time.perf_counter() - t0
                break
    finally:
        listener.close()
        path.unlink(missing_ok=True)
    status_line = next((f[7:] for f in message.splitlines() if f.startswith("STATUS=")), "")
    return {"ready_s": ready, "wall_start": wall0, "status_line": status_line}


def containers_and_recovery(workdir: Path, sizes: dict, out: dict) -> None:
    """``containers`` preloaded models: status latency, then kill -9 and restart with adoption, ``recoveries`` times."""
    count = sizes["containers"]
    paths = make_models(workdir, count, "r")
    names = [f"r{i:03d}" for i in range(count)]
    models = [entry(n, p, preload=True, ttl="0") for n, p in zip(names, paths)]
    out["containers"] = count
    t0 = time.perf_counter()
    daemon = Daemon(workdir, models, port_range=PORT_RANGE)
    try:
        wait_until(lambda: all_ready(daemon.socket, names), 300, f"{count} preloaded models ready", 0.1)
        out["preload_all_ready_s"] = round(time.perf_counter() - t0, 2)
        out["status_cli"] = cli_status_latency(daemon, sizes["status_runs"])
        out["status_api"] = status_api_latency(daemon.socket, sizes["status_runs"])
        out["status_json_bytes"] = len(control_get(daemon.socket, "/status")[1])
        out["idle_with_containers"] = usage_window(daemon.pid, min(5.0, sizes["window_s"]))

        runs = out["recovery_runs"] = []
        for _ in range(sizes["recoveries"]):
            before = {m["name"]: m["container"] for m in control_status(daemon.socket)["models"]}
            daemon.kill()
            run = restart_with_notify(daemon, workdir)
            status = control_status(daemon.socket)
            after = {m["name"]: (m["state"], m["container"]) for m in status["models"]}
            adopts = [e for e in control_events(daemon.socket) if e["kind"] == "adopt"]
            times = sorted(e["time"] for e in adopts)
            runs.append(
                {
                    "ready_s": round(run["ready_s"], 3),
                    "first_adopt_s": round(times[0] - run["wall_start"], 3) if times else None,
                    "adopting_s": round(times[-1] - times[0], 3) if times else None,
                    "adopted": len(adopts),
                    "ready_same_container": sum(after[n] == ("ready", before[n]) for n in names),
                    "status_line": run["status_line"],
                }
            )
        out["recovery_ready"] = spread([r["ready_s"] for r in runs], 3) | {"unit": "s"}
        firsts = [r["first_adopt_s"] for r in runs if r["first_adopt_s"] is not None]
        spans = [r["adopting_s"] for r in runs if r["adopting_s"] is not None]
        if firsts:
            out["recovery_first_adopt"] = spread(firsts, 3) | {"unit": "s"}
            out["recovery_adopting"] = spread(spans, 3) | {"unit": "s"}
        out["recovery_all_adopted"] = all(r["ready_same_container"] == count for r in runs)
        out["python_import"] = python_import_cost(3)
    finally:
        daemon.stop()


def run(workdir: Path, quick: bool = False) -> dict:
    sizes = QUICK if quick else FULL
    workdir.mkdir(parents=True, exist_ok=True)
    old_soft, hard = raise_own_nofile(4 * sizes["connections"] + 1024)
    result: dict = {
        "quick": quick,
        "sizes": sizes,
        "machine": machine_facts(),
        "bench_nofile": {"before": [old_soft, hard], "now": list(resource.getrlimit(resource.RLIMIT_NOFILE))},
    }
    started = time.perf_counter()
    phases = [("scale", footprint_and_scale), ("soft_limit_1024", soft_limit_check), ("fleet", containers_and_recovery)]
    result["failures"] = {}
    try:
        for name, phase in phases:
            if name == "soft_limit_1024" and not sizes["soft_limit_check"]:
                continue
            out = result[name] = {}
            try:
                phase(workdir, sizes, out)  # fills ``out`` as it goes: a failure keeps what was measured
            except Exception as exc:  # report it, and go on with the next phase
                result["failures"][name] = f"{type(exc).__name__}: {exc}"[:600]
    finally:
        remove_bench_containers()  # anything a crashed run left (labelled by Daemon's default labels)
    result["bench_seconds"] = round(time.perf_counter() - started, 1)
    return result


# --- the report -----------------------------------------------------------------------------------------------------


def _target(value: float | None, target: float, unit: str) -> str:
    if value is None:
        return "not measured"
    if value <= target:
        return f"met ({value} {unit} ≤ {target} {unit}; {round(target - value, 3)} {unit} to spare)"
    return f"missed by {round(value - target, 3)} {unit} ({value} {unit} > {target} {unit})"


def _samples(errors: list[str]) -> str:
    return "; ".join(e[:160].replace("|", "\\|") for e in errors)


def _ms(s: dict | None, *keys: str) -> str:
    return " | ".join(str(s[k]) if s else "–" for k in keys)


def render(result: dict) -> str:
    m = result["machine"]
    lines = [
        "## Footprint, scale and recovery" + (" (quick smoke run)" if result["quick"] else ""),
        "",
        f"Command: `.venv/bin/python bench/scale.py{' --quick' if result['quick'] else ''}` "
        f"({result['bench_seconds']} s). Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB, "
        f"Docker {m['docker']}, Python {m['python']}, localllm {m['localllm']}, {m['when']}. "
        "Models are generated tiny GGUFs (context 256, one slot). The client runs on the same cores as the "
        "daemon. MB = 10^6 bytes; CPU is CPU seconds per wall second of the localllmd process alone "
        "(1.0 = one core).",
        "",
    ]
    for phase, problem in result.get("failures", {}).items():
        lines += [f"**The {phase} phase failed**: {_samples([problem])}. What it measured before is below.", ""]
    scale, fleet = result.get("scale", {}), result.get("fleet", {})
    lines += _render_footprint(scale, fleet)
    lines += ["### Scale", ""]
    if "idle_connections" in scale:
        lines += _render_held(scale["idle_connections"], scale, result["sizes"]["hold_s"])
    if result.get("soft_limit_1024", {}).get("connections"):
        lines += _render_soft_limit(result["soft_limit_1024"])
    if "streams" in scale:
        lines += _render_streams(scale["streams"])
    lines += _render_status(scale, fleet)
    if "recovery_ready" in fleet:
        lines += _render_recovery(fleet)
    return "\n".join(lines)


def _render_footprint(scale: dict, fleet: dict) -> list[str]:
    lines = ["### Footprint", "", "| situation | RSS MB | CPU s/s | window s | notes |", "|---|---|---|---|---|"]
    if "idle" in scale:
        idle = scale["idle"]
        lines.append(
            f"| idle, catalog of {scale['catalog']} models, none loaded | {idle['rss_mb']} | "
            f"{idle['cpu_per_s']} | {idle['wall_s']} | {idle['fds_open']} fds open |"
        )
    if "under_load" in scale:
        load = scale["under_load"]
        lines.append(
            f"| {load['concurrency']} concurrent non-streaming chats (max_tokens 1), one model | "
            f"{load['rss_mb']} | {load['cpu_per_s']} | {load['wall_s']} | {load['requests']} requests, "
            f"{load['requests_per_s']} req/s, {load['errors']} errors; latency p50 "
            f"{_ms(load['latency'], 'p50_ms')} ms, p99 {_ms(load['latency'], 'p99_ms')} ms |"
        )
    if "while_holding" in scale.get("idle_connections", {}):
        held = scale["idle_connections"]
        w = held["while_holding"]
        lines.append(
            f"| holding {held['connections']} idle SSE connections | {w['rss_mb']} | {w['cpu_per_s']} | "
            f"{w['wall_s']} | {w['fds_open']} fds open |"
        )
    if "idle_with_containers" in fleet:
        w = fleet["idle_with_containers"]
        lines.append(
            f"| idle, {fleet['containers']} containers running | {w['rss_mb']} | {w['cpu_per_s']} | {w['wall_s']} | |"
        )
    idle_rss = scale.get("idle", {}).get("rss_mb")
    return lines + [
        "",
        f"- Target RSS ≤ {RSS_IDLE_TARGET_MB} MB idle: {_target(idle_rss, RSS_IDLE_TARGET_MB, 'MB')}.",
        "",
    ]


def _render_held(held: dict, scale: dict, hold_s: float) -> list[str]:
    return [
        f"**{held['connections']} concurrent idle SSE connections** (a model that never gets ready, "
        f"held {hold_s} s once all were open): {'no error' if held['ok'] else 'FAILED'}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| got 200 + `text/event-stream` headers | {held['with_headers']} / {held['connections']} |",
        f"| time until all had headers | {held['all_headers_s']} s |",
        f"| headers p50 / p99 | {_ms(held['headers'], 'p50_ms')} ms / {_ms(held['headers'], 'p99_ms')} ms |",
        f"| got ≥ {held['keepalives_wanted_each']} keep-alive comments | {held['with_enough_keepalives']} / "
        f"{held['connections']} |",
        f"| gap between keep-alives p50 / p99 / max | "
        f"{_ms(held['keepalive_gap'], 'p50_ms', 'p99_ms', 'max_ms').replace(' | ', ' / ')} ms (5000 wanted) |",
        f"| errors | {held['errors']} {_samples(held['error_samples'])} |",
        f"| queue (`waiting`) while holding | {held['waiting_while_holding']} |",
        f"| control `/health` during the hold, once a second (HTTP status × times) | "
        f"{held['control_health_during_hold']} {_samples(held['control_problems_during_hold'])} |",
        f"| queue empty after the clients closed | {held.get('queue_empty_after_close_s', '–')} s |",
        f"| daemon healthy after (control /health, a chat) | {held.get('healthy', '–')} |",
        f"| daemon RSS after close | {held.get('rss_mb_after_close', '–')} MB |",
        f"| daemon RLIMIT_NOFILE (soft, hard), inherited | {scale['daemon_nofile']} |",
        "",
    ]


def _render_soft_limit(soft: dict) -> list[str]:
    return [
        f"**{soft['connections']} waiting streams against a daemon started with a soft RLIMIT_NOFILE of "
        f"{SYSTEMD_DEFAULT_NOFILE}** (systemd's default for a service; the unit now sets LimitNOFILE=65536 and "
        f"localllmd raises its soft limit itself): the daemon's limit, as read from /proc: "
        f"{soft['daemon_nofile']}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| got headers within 20 s | {soft['with_headers']} / {soft['connections']} |",
        f"| errors | {soft['errors']}: {_samples(soft['error_samples'])} |",
        f"| daemon fds open after connecting | {soft['daemon_fds_open_after_connect']} "
        "(each waiting stream holds one; a streamed answer two: client and upstream) |",
        f"| control `/health` during the hold (HTTP status × times) | {soft['control_health_during_hold']} |",
        f'| "Too many open files" lines in the daemon log | {soft.get("log_too_many_open_files", "–")} |',
        f"| control `/health` afterwards | {soft.get('after_close_problem') or soft.get('control_health')} "
        f"{_samples(soft.get('control_problems') or [])} |",
        "",
    ]


def _render_streams(streams: dict) -> list[str]:
    first = streams["runs"][0]
    lines = [
        f"**{first['streams']} concurrent streams** (max_tokens {first['max_tokens']}, one loaded model), through the "
        "proxy and, in the same run, straight to its llama-server, in the order shown (times in ms):",
        "",
        "| path | completed | errors | wall s | TTFT min | TTFT p50 | TTFT p99 | TTFT max | duration p50 | "
        "duration p99 | daemon fds (max) | model faults |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in streams["runs"]:
        name = "localllm proxy" if r["path"] == "proxy" else "llama-server direct"
        lines.append(
            f"| {name} | {r['completed']}/{r['streams']} | {r['errors']} | {r['wall_s']} | "
            f"{_ms(r['ttft'], 'min_ms', 'p50_ms', 'p99_ms', 'max_ms')} | "
            f"{_ms(r['duration'], 'p50_ms', 'p99_ms')} | {r['daemon_max_fds'] or ''} | "
            f"{len(r['model_faults'])} |"
        )
    faults = [f for r in streams["runs"] for f in r["model_faults"]]
    if faults:
        lines += ["", f"Model faults during these runs (failed liveness probes, restarts): {_samples(faults[:4])}."]
    errors = [e for r in streams["runs"] for e in r["error_samples"]]
    if errors:
        lines += ["", "Error samples: " + _samples(errors[:2])]
    if "wall_ratio_proxy_to_direct" in streams:
        lines += [
            "",
            f"Proxy / direct (medians over the runs above): wall {streams['wall_ratio_proxy_to_direct']}, "
            f"TTFT p50 {streams['ttft_p50_ratio_proxy_to_direct']}. llama-server has one slot, so the "
            "streams queue inside it: the TTFT spread is mostly that queue, and it varies from run to run "
            "on a shared machine.",
        ]
    return lines + [""]


def _render_status(scale: dict, fleet: dict) -> list[str]:
    if "status_api" not in fleet and "status_api_idle" not in scale:
        return []
    lines = [
        f"**Status with {fleet.get('containers', '?')} running containers** "
        f"({fleet.get('status_json_bytes', '?')} bytes of JSON; all preloaded and ready in "
        f"{fleet.get('preload_all_ready_s', '?')} s):",
        "",
        "| command | min ms | median ms | max ms | runs |",
        "|---|---|---|---|---|",
    ]
    if "status_api" in fleet:
        lines += [
            f"| `localllmctl status --json` (process) | {_ms(fleet['status_cli'], 'min', 'median', 'max', 'runs')} |",
            f"| control API `GET /status` (unix socket) | {_ms(fleet['status_api'], 'min', 'median', 'max', 'runs')} |",
        ]
    if "status_api_idle" in scale:
        lines.append(
            f"| control API `GET /status`, {scale['catalog']}-model catalog, idle | "
            f"{_ms(scale['status_api_idle'], 'min', 'median', 'max', 'runs')} |"
        )
    return lines + [""]


def _render_recovery(fleet: dict) -> list[str]:
    def row(label: str, key: str) -> str:
        return f"| {label} | {_ms(fleet[key], 'min', 'median', 'max', 'runs')} |"

    lines = [
        "### Recovery",
        "",
        f"kill -9 with {fleet['containers']} containers running, then a new localllmd with `$NOTIFY_SOCKET`: "
        "process start until `READY=1`.",
        "",
        "| figure | min s | median s | max s | runs |",
        "|---|---|---|---|---|",
        row("start → READY=1", "recovery_ready"),
    ]
    if "recovery_first_adopt" in fleet:
        lines += [
            row("start → first `adopt` event", "recovery_first_adopt"),
            row("first → last `adopt` event", "recovery_adopting"),
        ]
    if "python_import" in fleet:
        lines.append(row("Python start + `import supervisor.daemon` alone", "python_import"))
    ready = fleet["recovery_ready"]
    return lines + [
        "",
        f"- All {fleet['containers']} adopted, ready, same container ids, in every run: "
        f"{fleet['recovery_all_adopted']}.",
        f"- Target ≤ {RECOVERY_TARGET_S} s to READY (median): {_target(ready['median'], RECOVERY_TARGET_S, 's')}; "
        f"worst run: {_target(ready['max'], RECOVERY_TARGET_S, 's')}.",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in seconds")
    parser.add_argument("--json", type=Path, help="also write the raw result here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM too
    with tempfile.TemporaryDirectory(prefix="lsc-") as tmp:
        result = run(Path(tmp), quick=args.quick)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))


if __name__ == "__main__":
    main()
