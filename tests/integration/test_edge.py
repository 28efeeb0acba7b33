"""The proxy's network edge against a real daemon: slow sockets, large bodies, media types, what a client is told
of a model that fails, and the fields the proxy changes. One daemon serves the whole module."""

from __future__ import annotations

import contextlib
import json
import selectors
import signal
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
import yaml

from .conftest import (
    INSTANCE_NUMBERS,
    RUN_ID,
    TEST_RUN_LABEL,
    DaemonProcess,
    executable,
    free_tcp_port,
    our_containers,
    poll_for,
)

MARKER = f"MARKER-{uuid.uuid4().hex[:12]}"
HEADER_TIMEOUT = 3.0
SLOW_SOCKETS = 2000
MIB = 2**20
BODY = 64 * MIB  # daemon.proxy_limits.max_body's default: the largest body the proxy takes
CAP = 8  # request_fields.max_tokens


@pytest.fixture(scope="module")
def daemon(engine, models_dir, tmp_path_factory):
    """localllmd with ``tiny`` (preloaded) and ``leaky``, a server that prints MARKER and exits at start."""
    directory = tmp_path_factory.mktemp("edge")
    instance = f"t{RUN_ID}-{next(INSTANCE_NUMBERS)}"
    port, base = free_tcp_port(), 30000 + (int(RUN_ID, 16) % 50) * 40 + 33 * 10
    config = {
        "profile": "cpu-only",
        "daemon": {
            "instance": instance,
            "proxy_listen": f"127.0.0.1:{port}",
            "port_range": [base, base + 9],
            "state_dir": str(directory / "state"),
            "labels": {TEST_RUN_LABEL: RUN_ID},
            "startup_timeout": 30,
            "stop_grace": 5,
            "log_level": "DEBUG",
            "proxy_limits": {"header_timeout": HEADER_TIMEOUT},
            "request_fields": {"max_tokens": CAP},
        },
        "models": [
            {
                "name": "tiny",
                "gguf": str(models_dir / "tiny.gguf"),
                "context_size": 256,
                "parallel": 2,
                "preload": True,
            },
            {
                "name": "leaky",
                "gguf": str(models_dir / "tiny2.gguf"),
                "context_size": 256,
                "extra_args": [f"--{MARKER}"],
            },
        ],
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = directory / "localllmd.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [executable("localllmd"), "--config", str(path)], stdout=out, stderr=subprocess.STDOUT
        )
    started = DaemonProcess(
        path, instance, f"http://127.0.0.1:{port}/v1", directory / "state" / "control.sock", process, log, config
    )
    try:
        poll_for(lambda: process.poll() is not None or started.try_status(), 30, "the control API")
        assert process.poll() is None, f"localllmd exited early:\n{started.log()}"
        started.wait_state("tiny", "ready")
        yield started
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        for container in our_containers(engine, instance):
            container.remove(force=True)


def proxy_address(daemon) -> tuple[str, int]:
    return "127.0.0.1", int(daemon.proxy_url.split(":")[2].split("/")[0])


def health_seconds(daemon) -> float:
    started = time.monotonic()
    answer = requests.get(daemon.proxy_url.removesuffix("/v1") + "/health", timeout=10)
    assert answer.status_code == 200
    return time.monotonic() - started


def test_health_answers_within_a_second_while_2000_slow_sockets_are_open_and_they_are_dropped_at_the_deadline(daemon):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, SLOW_SOCKETS * 2 + 256)), hard))
    opened_at: dict[socket.socket, float] = {}
    closed_after: dict[socket.socket, float] = {}
    stop = threading.Event()

    def trickle() -> None:  # half of them send a byte of their head every half second
        while not stop.wait(0.5):
            for sock in list(opened_at)[::2]:
                if sock not in closed_after:
                    with contextlib.suppress(OSError):
                        sock.send(b"X")

    try:
        for n in range(SLOW_SOCKETS):
            sock = socket.create_connection(proxy_address(daemon), timeout=10)
            opened_at[sock] = time.monotonic()
            if n % 2 == 0:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        all_open = time.monotonic()
        latencies = [health_seconds(daemon) for _ in range(5)]
        with selectors.DefaultSelector() as watch:
            for sock in opened_at:
                watch.register(sock, selectors.EVENT_READ)
            while len(closed_after) < SLOW_SOCKETS and time.monotonic() - all_open < HEADER_TIMEOUT + 10:
                latencies.append(health_seconds(daemon))
                for key, _ in watch.select(0.2):
                    with contextlib.suppress(OSError):  # the 408, then the end; or a reset
                        while key.fileobj.recv(65536):
                            pass
                    closed_after[key.fileobj] = time.monotonic() - opened_at[key.fileobj]
                    watch.unregister(key.fileobj)
        stop.set()
        trickler.join()
        print(
            f"\n/health with {SLOW_SOCKETS} slow sockets: max {max(latencies) * 1000:.1f} ms, median "
            f"{sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms over {len(latencies)} requests; slow sockets "
            f"closed after {min(closed_after.values()):.2f}-{max(closed_after.values()):.2f} s"
        )
        assert max(latencies) < 1.0
        assert len(closed_after) == SLOW_SOCKETS, f"{SLOW_SOCKETS - len(closed_after)} slow sockets still open"
        assert HEADER_TIMEOUT - 0.5 < min(closed_after.values()) and max(closed_after.values()) < HEADER_TIMEOUT + 5
    finally:
        stop.set()
        for sock in opened_at:
            sock.close()
    assert health_seconds(daemon) < 1.0


def send_body(address: tuple[str, int], size: int, chunk: bytes, hold: bool = False) -> socket.socket | bytes:
    """POST a body of ``size`` bytes, reading the answer as soon as one comes; ``hold``: send a little and keep the
    socket (its body counts against the budget until it is closed)."""
    sock = socket.create_connection(address, timeout=30)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % size
    )
    if hold:
        sock.sendall(b'{"model": "tiny", "pad": "')
        return sock
    sent, answer = 0, b""
    with sock, selectors.DefaultSelector() as watch:
        sock.setblocking(False)
        watch.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            events = {event for _, event in watch.select(1)}
            if any(event & selectors.EVENT_READ for event in events):
                data = sock.recv(65536)
                answer += data
                if not data or b"\r\n\r\n" in answer and answer.endswith(b"}"):
                    return answer
            elif any(event & selectors.EVENT_WRITE for event in events):
                with contextlib.suppress(BlockingIOError):
                    sent += sock.send(chunk[: size - sent])
                if sent >= size:
                    watch.modify(sock, selectors.EVENT_READ)
    return answer


def test_twenty_concurrent_64mib_bodies_get_503_without_the_daemon_reading_them_and_it_keeps_serving(daemon):
    address = proxy_address(daemon)
    holders = [send_body(address, BODY, b"", hold=True) for _ in range(4)]  # 4 x 64 MiB: the whole budget
    process = psutil.Process(daemon.process.pid)
    rss_before = process.memory_info().rss
    chunk = b"x" * MIB
    try:
        time.sleep(0.5)
        started = time.monotonic()
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: send_body(address, BODY, chunk), range(20)))
        seconds = time.monotonic() - started
        rss_growth = process.memory_info().rss - rss_before
    finally:
        for sock in holders:
            sock.close()
    print(f"\n20 x 64 MiB bodies: all answered in {seconds:.2f} s; daemon RSS grew {rss_growth / MIB:.1f} MiB")
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), answer[:300]
        assert b"\r\nRetry-After: 2\r\n" in head
        assert json.loads(body)["error"]["code"] == "body_budget_exceeded"
    assert seconds < 30 and rss_growth < 200 * MIB
    answer = daemon.chat("tiny")
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(
    "headers", [{"Content-Type": "text/plain"}, {}, {"Content-Type": "application/x-www-form-urlencoded"}]
)
def test_a_json_route_without_application_json_gets_415(daemon, headers):
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    answer = requests.post(f"{daemon.proxy_url}/chat/completions", data=body, headers=headers, timeout=30)
    assert answer.status_code == 415
    assert answer.json()["error"]["code"] == "unsupported_media_type"
    assert daemon.model("tiny")["in_flight"] == 0


def test_a_model_that_prints_a_marker_and_exits_tells_the_client_nothing_of_it(daemon, models_dir):
    answer = daemon.chat("leaky")
    assert answer.status_code == 503
    error = answer.json()["error"]
    assert error["code"] == "model_start_failed"
    for secret in (MARKER, str(models_dir), "tiny2.gguf", "exit code", "docker.sock"):
        assert secret not in answer.text, secret
    error_id = error["message"].split("(error id ")[1].split(")")[0]
    assert error["message"].startswith("model 'leaky' failed to start (error id ")
    streamed = requests.post(
        f"{daemon.proxy_url}/chat/completions",
        timeout=120,
        json={"model": "leaky", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert streamed.status_code == 200 and "leaky" in streamed.text
    assert MARKER not in streamed.text and str(models_dir) not in streamed.text
    # The operator still sees everything: in the log under the error id, and on the control API.
    log = daemon.log()
    assert f"error {error_id} (not shown to the proxy client): model 'leaky' failed to start" in log
    assert MARKER in log[log.index(error_id) :][:4000]  # the container's last lines follow, on lines of their own
    assert MARKER in daemon.model("leaky")["error"]


def test_the_proxy_caps_generation_and_drops_the_slot_fields(daemon):
    unbounded = daemon.chat("tiny", n_predict=-1, ignore_eos=True, max_tokens=None, id_slot=1, cache_prompt=True)
    assert unbounded.status_code == 200, unbounded.text
    assert unbounded.json()["usage"]["completion_tokens"] == CAP
    huge = daemon.chat("tiny", max_tokens=10**6, ignore_eos=True)
    assert huge.status_code == 200 and huge.json()["usage"]["completion_tokens"] == CAP
    logs = subprocess.run(
        [executable("localllmctl"), "--socket", str(daemon.socket), "logs", "tiny"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert logs.returncode == 0 and "selected slot by " in logs.stdout  # llama-server says how it picks a slot
    assert "selected slot by id" not in logs.stdout  # and never by the id a client sent
