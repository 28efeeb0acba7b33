"""A stream whose upstream ends its body cleanly, without ``[DONE]`` or a finish reason, reaches the client
as an error, never as a short answer that passes for a complete one.

Ollama does that when its runner fails mid-generation; llama-server never cuts a stream cleanly, so the
truncating upstream here is a test image run as a llama.cpp model's ``image``: a small server that takes
llama-server's arguments (``--host``, its socket), answers ``/health``, and streams llama-server's own chunk shapes
(captured from the pinned build), then either finishes as llama-server does or ends the body after two
tokens. Everything else is real: the daemon, its container on the engine, the proxy's routing. A real
llama-server model beside it checks that complete streams pass through untouched.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from pathlib import Path

import docker
import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from .base_image import ensure_base_image, locked

IMAGE = "localllm/truncating-upstream:test"
KEY_LABEL = "io.localllm.truncating-upstream-key"
CUT = "please cut"  # a prompt ending in this makes the server end its body after two tokens

SERVER = r"""
import json, socketserver, sys, time
from http.server import BaseHTTPRequestHandler

SOCKET = sys.argv[sys.argv.index("--host") + 1]  # a UNIX socket, as localllm runs llama-server
ALIAS = sys.argv[sys.argv.index("--alias") + 1]


def chat(delta, finish):
    return {"choices": [{"finish_reason": finish, "index": 0, "delta": delta}], "created": int(time.time()),
            "id": "chatcmpl-fake", "model": ALIAS, "object": "chat.completion.chunk"}


def completion(text, finish):
    return {"choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            "created": int(time.time()), "model": ALIAS, "object": "text_completion", "id": "cmpl-fake"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.answer(200, b'{"status":"ok"}')

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not body.get("stream"):
            return self.answer(404, b'{"error":"only streams here"}')
        if "prompt" in body:
            prompt, events = body["prompt"], [completion(t, None) for t in ("one", " two")]
            finish = completion("", "length")
        else:
            prompt = body["messages"][-1]["content"]
            events = [chat({"role": "assistant", "content": None}, None), chat({"content": "one"}, None),
                      chat({"content": " two"}, None)]
            finish = chat({}, "length")
        if not prompt.endswith("please cut"):
            events.append(finish)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.echo_close()
        self.end_headers()
        for event in events:
            self.chunk(b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")
            time.sleep(0.05)
        if not prompt.endswith("please cut"):
            self.chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")  # the body ends cleanly: no reset, no broken chunk

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def log_message(self, *args):
        pass

    def echo_close(self):
        # As llama-server (cpp-httplib) and Go's net/http do: a request that asks to close is answered so
        if self.headers.get("Connection", "").lower() == "close":
            self.send_header("Connection", "close")

    def answer(self, status, data):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.echo_close()
        self.end_headers()
        self.wfile.write(data)


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


Server(SOCKET, Handler).serve_forever()
"""
DOCKERFILE = """\
FROM {base}
COPY server.py /server.py
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
ENTRYPOINT ["python3", "/server.py"]
"""


def ensure_truncating_image(client: docker.DockerClient) -> str:
    """Build :data:`IMAGE` from the local Debian python base, unless one from the same recipe exists."""
    base = ensure_base_image(client)
    key = hashlib.sha256(SERVER.encode() + DOCKERFILE.encode() + client.images.get(base).id.encode()).hexdigest()[:16]
    with locked(Path(tempfile.gettempdir()) / "localllm-truncating-upstream.lock"):
        try:
            if (client.images.get(IMAGE).labels or {}).get(KEY_LABEL) == key:
                return IMAGE
        except docker.errors.ImageNotFound:
            pass
        with tempfile.TemporaryDirectory(prefix="truncating-upstream-") as context:
            (Path(context) / "server.py").write_text(SERVER)
            (Path(context) / "Dockerfile").write_text(DOCKERFILE.format(base=base))
            client.images.build(
                path=context, tag=IMAGE, labels={KEY_LABEL: key}, pull=False, rm=True, forcerm=True, network_mode="none"
            )
    return IMAGE


@pytest.fixture
def daemon(start_daemon, engine):
    image = ensure_truncating_image(engine)
    # "cutter" is not preloaded: its first stream waits for the load (SSE comments first), the next go straight.
    return start_daemon(
        [
            {"name": "cutter", "gguf": "tiny.gguf", "image": image},
            {"name": "tiny", "gguf": "tiny.gguf", "preload": True},
        ]
    )


def data_lines(daemon, path: str, body: dict) -> list[bytes]:
    with requests.post(
        f"{daemon.proxy_url}/{path}", json={**body, "stream": True}, stream=True, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return [line for line in response.iter_lines() if line.startswith(b"data:")]


def chat_lines(daemon, model: str, prompt: str) -> list[bytes]:
    return data_lines(
        daemon, "chat/completions", {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": prompt}]}
    )


def assert_truncation_error(lines: list[bytes], tokens: int) -> None:
    *events, last = lines
    assert len(events) == tokens and all(b'"error"' not in e for e in events), lines
    error = json.loads(last[6:])["error"]
    assert error["code"] == "upstream_failed" and error["type"] == "server_error", error
    assert "ended without [DONE] or a finish reason (truncated)" in error["message"]
    assert b"data: [DONE]" not in lines


def requests_counted(daemon) -> dict[tuple[str, str, str], float]:
    text = subprocess.run(
        ["curl", "-s", "--unix-socket", str(daemon.socket), "http://localllmd/metrics"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return {
        (s.labels["model"], s.labels["endpoint"], s.labels["code"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "localllm_requests_total"
    }


def test_a_stream_cut_off_cleanly_ends_with_an_error_event_while_complete_ones_pass(daemon):
    assert_truncation_error(chat_lines(daemon, "cutter", f"count, {CUT}"), tokens=3)  # waited for the load
    assert_truncation_error(chat_lines(daemon, "cutter", f"again, {CUT}"), tokens=3)  # straight to the model
    assert_truncation_error(data_lines(daemon, "completions", {"model": "cutter", "prompt": f"x {CUT}"}), tokens=2)
    # The same server, finishing: passed on byte for byte, no error added.
    finished = chat_lines(daemon, "cutter", "count")
    assert finished[-1] == b"data: [DONE]" and b'"finish_reason":"length"' in finished[-2]
    assert not any(b'"error"' in line for line in finished)
    # Real llama-server streams, chat and /completions, end as they should and are left alone.
    for lines in (
        chat_lines(daemon, "tiny", "hi"),
        data_lines(daemon, "completions", {"model": "tiny", "prompt": "hi", "max_tokens": 4}),
    ):
        assert lines[-1] == b"data: [DONE]" and not any(b'"error"' in line for line in lines), lines
    assert "ended its stream without [DONE] or a finish reason" in daemon.log()
    counted = requests_counted(daemon)
    assert counted[("cutter", "chat/completions", "502")] == 2 and counted[("cutter", "completions", "502")] == 1
    assert counted[("cutter", "chat/completions", "200")] == 1 and counted[("tiny", "chat/completions", "200")] == 1
    assert daemon.model("cutter")["state"] == "ready"  # the server still runs: only this answer was cut


def test_the_openai_sdk_raises_instead_of_returning_a_short_answer(daemon):
    client = openai.OpenAI(base_url=daemon.proxy_url, api_key="unused", max_retries=0)
    received = []
    with pytest.raises(openai.APIError, match=r"truncated"):
        for chunk in client.chat.completions.create(
            model="cutter", stream=True, max_tokens=4, messages=[{"role": "user", "content": f"hi, {CUT}"}]
        ):
            received.extend(choice.delta.content or "" for choice in chunk.choices)
    assert "".join(received) == "one two"
    streamed = client.chat.completions.create(
        model="cutter", stream=True, max_tokens=4, messages=[{"role": "user", "content": "hi"}]
    )
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "length"
