"""The proxy's deadlines against a real llama-server that stops answering: its container paused (``docker pause``)
mid-stream, and before it answers at all. The unit tests (test_proxy_timeouts.py) show each deadline against
stand-ins; here the server, the engine and the daemon are the real ones.
"""

from __future__ import annotations

import json
import time

import requests

from .conftest import long_stream, our_containers

STREAM_IDLE = 1.0  # seconds: daemon.timeouts.stream_idle here
FIRST_BYTE = 3.0  # seconds: daemon.timeouts.first_byte here
MARGIN = 0.6  # seconds a deadline may fire late (the daemon's loop, the engine's pause)


def test_a_paused_server_ends_a_stream_at_stream_idle_and_a_request_at_first_byte(start_daemon, engine):
    daemon = start_daemon(
        [{"name": "slow", "gguf": "slow.gguf", "context_size": 4096, "preload": True}],
        timeouts={"stream_idle": f"{STREAM_IDLE}s", "first_byte": f"{FIRST_BYTE}s"},
        liveness={"period": "60s"},  # the pauses are the proxy's to notice, not liveness's
    )
    [container] = our_containers(engine, daemon.instance)
    body = long_stream("slow", 4000)
    try:
        with requests.post(f"{daemon.proxy_url}/chat/completions", json=body, stream=True, timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith(b"data: {")
            container.pause()
            paused_at = time.monotonic()
            tail = [line for line in lines if line.startswith(b"data: ")]
            ended_after = time.monotonic() - paused_at
        container.unpause()
        error = json.loads(tail[-1][6:])["error"]
        assert error["code"] == "upstream_timeout", error
        assert "sent nothing for 1s mid-answer (daemon.timeouts.stream_idle)" in error["message"]
        # the deadline counts from the last chunk the proxy read, which came at most a token before the pause
        print(f"stream ended {ended_after:.3f}s after the pause (stream_idle {STREAM_IDLE:g}s)")
        assert STREAM_IDLE - 0.2 <= ended_after < STREAM_IDLE + MARGIN

        container.pause()
        started = time.monotonic()
        answer = daemon.chat("slow")
        took = time.monotonic() - started
        container.unpause()
        print(f"a request to the paused server got {answer.status_code} after {took:.3f}s (first_byte {FIRST_BYTE:g}s)")
        assert answer.status_code == 504, answer.text
        error = answer.json()["error"]
        assert error["code"] == "upstream_timeout" and "(daemon.timeouts.first_byte)" in error["message"]
        assert FIRST_BYTE <= took < FIRST_BYTE + MARGIN
    finally:
        container.reload()
        if container.status == "paused":
            container.unpause()
    assert daemon.chat("slow").status_code == 200  # running again, the model serves: nothing was left held
    assert "(daemon.timeouts.first_byte)" in daemon.log() and daemon.model("slow")["state"] == "ready"
    assert [c.id for c in our_containers(engine, daemon.instance)] == [container.id]  # not replaced: it was alive
