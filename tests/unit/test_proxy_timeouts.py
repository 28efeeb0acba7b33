"""The proxy's deadlines on model servers (``daemon.timeouts``), each shown to fire, and when, against a server that
stalls: one that takes no connection, one that never answers, one whose stream stops.

The fleet is the real one, with the recording fake runtime (fleet_harness.py); each "container" here is a stand-in
llama-server (``Stalling``) that does what the request's ``stall`` field says, and notes when the proxy closed the
connection it was stalling on: that is how a hung generation ends. Times are measured from the moment the stand-in
received the request (the same clock as the test's), and must fall within the setting plus ``MARGIN``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field, replace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from supervisor.api.proxy import create_proxy_app
from supervisor.core.containers import Endpoint

from .fleet_harness import RecordingFakeRuntime, cpu_fleet, scenario, socket_path, until

MIB = 2**20
SETTING = 0.5  # seconds: every deadline under test
LONG = 30.0  # seconds: the deadlines not under test
MARGIN = 0.4  # seconds a deadline may fire late on a loaded test machine
TOKEN = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"p"},"finish_reason":null}]}\n\n'
FINISH = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
ANSWER = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"}, "finish_reason": "stop"}]}


@dataclass
class Stalling:
    """A llama-server stand-in. Its chat answer, by the request's ``stall``: ``head``, none at all; ``first-chunk``,
    a stream's headers and then nothing; ``mid-stream``, ``tokens`` tokens (``gap`` seconds apart) and then
    nothing; anything else, a whole answer. It records when each request came, and how long after it the proxy
    closed a connection it stalled on."""

    received: list[float] = field(default_factory=list)
    closed_after: list[float] = field(default_factory=list)

    def app(self) -> web.Application:
        async def healthy(request: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        app = web.Application()
        app.router.add_get("/health", healthy)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/messages", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.received.append(time.monotonic())
        body = await request.json()
        stall = body.get("stall")
        if stall == "head":
            return await self._until_closed(request, web.Response())
        if not body.get("stream"):
            return web.json_response(ANSWER)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)  # the headers go out at once
        if stall == "first-chunk":
            return await self._until_closed(request, response)
        for _ in range(int(body.get("tokens", 2))):
            await response.write(TOKEN)
            await asyncio.sleep(float(body.get("gap", 0)))
        if stall == "mid-stream":
            return await self._until_closed(request, response)
        await response.write(FINISH)
        await response.write_eof()
        return response

    async def _until_closed(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        while request.transport is not None and not request.transport.is_closing():
            await asyncio.sleep(0.01)
        self.closed_after.append(time.monotonic() - self.received[-1])
        return response


@dataclass
class StallingRuntime(RecordingFakeRuntime):
    """The recording fake, whose llama-servers are ``server``."""

    server: Stalling = field(default_factory=Stalling)

    async def run(self, spec):
        info = await super().run(spec)
        container = self.containers[info.id]
        if info.running:
            await container.runner.cleanup()
            container.runner = web.AppRunner(self.server.app(), shutdown_timeout=0.1)
            await container.runner.setup()
            await web.UnixSite(container.runner, socket_path(spec)).start()
        return info


def timeouts(**chosen: float) -> dict:
    return {"upstream_connect": LONG, "first_byte": LONG, "stream_idle": LONG, **chosen}


def proxied(tmp_path, test, *, preload: bool = True, **chosen: float):
    """Run ``test(post, fleet, server, failures)`` against a proxy in front of model ``a`` (at most one request at a
    time: a request that kept it would keep the next one out); ``post(body, path)`` answers (status, raw body, the
    monotonic time the answer's body ended); ``failures`` lists the upstream failures the proxy noted."""

    async def body(session):
        runtime = StallingRuntime()
        fleet, _, _ = cpu_fleet(
            tmp_path, session, {"a": MIB}, runtime, models={"a": {"max_concurrent": 1}}, timeouts=timeouts(**chosen)
        )
        failures: list[str] = []
        noted = fleet.note_upstream_failure
        fleet.note_upstream_failure = lambda instance: (failures.append(instance.name), noted(instance))[1]
        if preload:
            await fleet.load("a")
        app = create_proxy_app(fleet, session, fleet.settings)
        try:
            async with TestServer(app, host="127.0.0.1") as proxy, aiohttp.ClientSession() as client:

                async def post(request: dict, path: str = "/v1/chat/completions") -> tuple[int, bytes, float]:
                    request = {"model": "a", "messages": [{"role": "user", "content": "ping"}], **request}
                    async with client.post(proxy.make_url(path), json=request) as answer:
                        raw = await answer.read()
                        return answer.status, raw, time.monotonic()

                await test(post, fleet, runtime.server, failures)
        finally:
            await fleet.shutdown()

    scenario(body, tmp_path)


def error_of(raw: bytes) -> dict:
    """The error a stream ended with: its last SSE data, in OpenAI's shape or Anthropic's."""
    data = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]
    return json.loads(data[-1])["error"]


def within(took: float, setting: float = SETTING) -> bool:
    print(f"fired after {took:.3f}s (setting {setting:g}s)")
    return setting <= took < setting + MARGIN


def test_a_non_streaming_request_whose_server_never_answers_gets_504_within_first_byte(tmp_path):
    async def test(post, fleet, server, failures):
        status, raw, ended = await post({"stall": "head"})
        assert status == 504, raw
        error = json.loads(raw)["error"]
        assert error["code"] == "upstream_timeout"
        assert error["message"].startswith("model 'a' did not answer within 0.5s (daemon.timeouts.first_byte)")
        assert within(ended - server.received[0])
        await until(lambda: server.closed_after, what="the stalled connection to close")
        assert within(server.closed_after[0])  # closed: llama-server ends a generation whose client left
        assert failures == ["a"]
        status, raw, _ = await post({})  # the model is not kept busy (max_concurrent 1): it answers the next one
        assert status == 200 and json.loads(raw) == ANSWER

    proxied(tmp_path, test, first_byte=SETTING)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_a_stream_that_stalls_mid_answer_ends_with_an_error_event_within_stream_idle(tmp_path, path):
    async def test(post, fleet, server, failures):
        status, raw, ended = await post({"stream": True, "stall": "mid-stream", "tokens": 2}, path)
        assert status == 200 and raw.count(b'"content":"p"') == 2, raw
        error = error_of(raw)
        if path == "/v1/messages":  # Anthropic's event: error
            assert b"event: error\ndata: " in raw and error["type"] == "api_error"
        else:
            assert error["code"] == "upstream_timeout"
        assert "model 'a' sent nothing for 0.5s mid-answer (daemon.timeouts.stream_idle)" in error["message"]
        assert within(ended - server.received[0])  # the tokens came at once, then the silence
        await until(lambda: server.closed_after, what="the stalled connection to close")
        assert within(server.closed_after[0])
        assert failures == ["a"]

    proxied(tmp_path, test, stream_idle=SETTING)


def test_a_stream_whose_first_chunk_never_comes_is_held_to_first_byte_not_stream_idle(tmp_path):
    async def test(post, fleet, server, failures):
        status, raw, ended = await post({"stream": True, "stall": "first-chunk"})
        assert status == 200  # the server's own headers came: the stream has begun
        error = error_of(raw)
        assert error["code"] == "upstream_timeout" and "(daemon.timeouts.first_byte)" in error["message"]
        assert within(ended - server.received[0])
        assert failures == ["a"]

    proxied(tmp_path, test, first_byte=SETTING, stream_idle=0.1)  # stream_idle alone would have cut it at 0.1 s


def test_a_slow_but_steady_stream_outlasts_stream_idle(tmp_path):
    async def test(post, fleet, server, failures):
        status, raw, ended = await post({"stream": True, "tokens": 6, "gap": 0.25})
        assert status == 200 and raw.count(b'"content":"p"') == 6 and raw.endswith(FINISH), raw
        assert ended - server.received[0] > 1.2 > SETTING  # the whole stream took longer than the setting
        assert failures == []

    proxied(tmp_path, test, stream_idle=SETTING, first_byte=SETTING)


def test_a_stream_that_waited_for_its_model_and_then_gets_no_answer_ends_with_an_error_event(tmp_path):
    async def test(post, fleet, server, failures):
        status, raw, ended = await post({"stream": True, "stall": "head"})
        assert status == 200 and raw.startswith(b": localllm: loading model a"), raw  # the loading notes' headers
        error = error_of(raw)
        assert error["code"] == "upstream_timeout" and "(daemon.timeouts.first_byte)" in error["message"]
        assert within(ended - server.received[0])
        assert failures == ["a"]

    proxied(tmp_path, test, preload=False, first_byte=SETTING)


def test_a_server_that_takes_no_connection_gets_504_within_upstream_connect(tmp_path):
    """A TCP endpoint whose listener's queue is full: the kernel drops the SYN, and connect() waits."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port))  # fills the queue of one

    async def test(post, fleet, server, failures):
        instance = fleet.instances["a"]
        instance.spec = replace(instance.spec, endpoint=Endpoint(port=port))  # a server elsewhere, say
        started = time.monotonic()
        status, raw, ended = await post({})
        assert status == 504, raw
        error = json.loads(raw)["error"]
        assert error["code"] == "upstream_timeout"
        assert error["message"].startswith(
            "model 'a' took no connection within 0.5s (daemon.timeouts.upstream_connect)"
        )
        assert within(ended - started)
        assert server.received == [] and failures == ["a"]

    try:
        proxied(tmp_path, test, upstream_connect=SETTING)
    finally:
        queued.close()
        listener.close()
