"""Faults on the real engine: a killed container mid-stream, a crash loop, a frozen container."""

from __future__ import annotations

import json
import time

import requests

from .conftest import assert_invariants, long_stream, our_containers, poll_for


def start_events(engine, instance: str, since: float) -> int:
    """How many of our containers the engine started since ``since`` (from the engine's own event log)."""
    events = engine.events(
        since=int(since),
        until=int(time.time()) + 1,
        decode=True,
        filters={"type": "container", "event": "start", "label": f"io.localllm.owner={instance}"},
    )
    return sum(1 for _ in events)


def test_docker_kill_mid_stream_ends_the_stream_with_an_error_and_the_model_comes_back(start_daemon, engine):
    daemon = start_daemon(
        [{"name": "slow", "gguf": "slow.gguf", "context_size": 4096, "preload": True}], restart={"delay": "1s"}
    )
    [container] = our_containers(engine, daemon.instance)
    body = long_stream("slow", 4000)
    with requests.post(f"{daemon.proxy_url}/chat/completions", json=body, stream=True, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith(b"data: {")
        killed_at = time.monotonic()
        container.kill()
        tail = [line for line in lines if line.startswith(b"data: ")]
        ended_after = time.monotonic() - killed_at
    error = json.loads(tail[-1][6:])["error"]
    assert error["code"] == "upstream_failed" and "broke off" in error["message"]
    assert ended_after < 5.0
    poll_for(
        lambda: [c for c in our_containers(engine, daemon.instance) if c.id != container.id],
        timeout=15,
        what="a replacement container",
    )
    poll_for(lambda: daemon.model("slow")["state"] == "ready", timeout=15, what="the model to come back")
    [replacement] = our_containers(engine, daemon.instance)
    assert replacement.id != container.id
    assert "failure 1 of 5: restarting in 1s" in daemon.log()
    assert daemon.chat("slow").status_code == 200
    assert_invariants(daemon, engine)


def test_a_crash_loop_backs_off_then_marks_the_model_failed_with_bounded_docker_calls(start_daemon, engine):
    since = time.time()
    daemon = start_daemon(
        [{"name": "bad", "gguf": "tiny.gguf", "preload": True, "extra_args": ["--no-such-flag"]}],
        wait_ready=False,
        restart={"delay": "0.2s", "max_delay": "1s", "max_failures": 4},
    )
    poll_for(lambda: daemon.model("bad")["gave_up"], timeout=30, what="the model to be marked failed")
    log = daemon.log()
    for n, delay in ((1, "0.2s"), (2, "0.4s"), (3, "0.8s")):
        assert f"failure {n} of 4: restarting in {delay}" in log
    assert "failed 4 times in a row and will not be restarted" in log
    status = daemon.model("bad")
    assert status["state"] == "failed" and status["failures"] == 4
    response = daemon.chat("bad")
    assert response.status_code == 503 and response.json()["error"]["code"] == "model_failed"
    assert "--no-such-flag" in daemon.model("bad")["error"]  # the server's own complaint is kept for operators
    time.sleep(2)
    assert start_events(engine, daemon.instance, since) == 4  # no more attempts after giving up
    assert our_containers(engine, daemon.instance) == []
    assert_invariants(daemon, engine)


def test_a_frozen_container_is_detected_and_replaced(start_daemon, engine):
    daemon = start_daemon(
        [{"name": "tiny", "gguf": "tiny.gguf", "preload": True}],
        liveness={"period": "0.5s", "timeout": "0.3s", "failure_threshold": 2},
    )
    [container] = our_containers(engine, daemon.instance)
    container.pause()
    paused_at = time.monotonic()
    poll_for(
        lambda: [
            c.id for c in our_containers(engine, daemon.instance) if c.status == "running" and c.id != container.id
        ],
        timeout=15,
        what="a replacement container",
    )
    replaced_after = time.monotonic() - paused_at
    assert "server unhealthy: 2 failed probes" in daemon.log()
    assert replaced_after < 2 * 0.5 + 0.3 + 5  # threshold x period, plus probe timeout and the restart
    assert daemon.chat("tiny").status_code == 200
    poll_for(lambda: len(our_containers(engine, daemon.instance)) == 1, timeout=15, what="the frozen one to go")
    assert_invariants(daemon, engine)
