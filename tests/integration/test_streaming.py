"""Streaming through the proxy: chunks pass through as they are produced, and a client that
goes away stops the generation upstream. Uses a larger generated model so generation takes
long enough to observe (hundreds of tokens at a few ms each on a CPU)."""

from __future__ import annotations

import json
import time

import pytest
import requests

from .conftest import ask_server, poll_for

LONG_GENERATION = {
    "max_tokens": 400,
    "ignore_eos": True,
    "stream": True,
    "messages": [{"role": "user", "content": "count"}],
}


@pytest.fixture
def daemon(start_daemon):
    # --slots: llama-server's slot view (off by default: it shows prompts), reachable on the socket only
    return start_daemon(
        [{"name": "slow", "gguf": "slow.gguf", "context_size": 1024, "preload": True, "extra_args": ["--slots"]}]
    )


def test_chunks_arrive_while_the_model_is_still_generating(daemon):
    started = time.monotonic()
    arrivals = []
    with requests.post(
        f"{daemon.proxy_url}/chat/completions", json={"model": "slow", **LONG_GENERATION}, stream=True, timeout=120
    ) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                json.loads(line[6:])
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) >= 100
    # Buffered, every event would arrive at the end; passed through, the first comes long before the last.
    assert arrivals[0] < 0.5 * arrivals[-1], (arrivals[0], arrivals[-1])


def test_client_disconnect_stops_generation_upstream(daemon, engine):
    def slot_busy() -> bool:
        return any(slot.get("is_processing") for slot in json.loads(ask_server(engine, daemon, "slow", "/slots")))

    response = requests.post(
        f"{daemon.proxy_url}/chat/completions",
        json={"model": "slow", **LONG_GENERATION, "max_tokens": 5000},
        stream=True,
        timeout=120,
    )
    lines = response.iter_lines()  # keep the generator: dropping it closes the connection
    next(lines)
    assert slot_busy()
    response.close()
    poll_for(lambda: not slot_busy(), timeout=5, what="llama-server to stop generating")
    poll_for(lambda: daemon.model("slow")["in_flight"] == 0, timeout=5, what="in-flight count back to 0")
    assert daemon.chat("slow").status_code == 200


def test_a_stream_then_a_plain_request_never_reuses_a_connection_llama_server_closed(start_daemon):
    """llama-server closes its connection after a stream without saying so; the proxy must not reuse it (it did:
    about 3% of such pairs got 502 upstream_failed)."""
    daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf", "preload": True}])
    with requests.Session() as client:  # a keep-alive client, as LibreChat's
        for _ in range(60):
            with client.post(
                f"{daemon.proxy_url}/chat/completions",
                stream=True,
                timeout=60,
                json={
                    "model": "tiny",
                    "stream": True,
                    "max_tokens": 4,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            ) as streamed:
                assert streamed.status_code == 200
                assert b"[DONE]" in b"".join(streamed.iter_content(None))
            plain = client.post(
                f"{daemon.proxy_url}/chat/completions",
                timeout=60,
                json={"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert plain.status_code == 200, plain.text
