"""The proxy's network edge on real sockets, in-process: read deadlines, keep-alive, the connection cap, the body
budget, media types and hosts (edge.py, intake.py); and what of an error a proxy client may see (web_errors.py)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import time

import pytest
from aiohttp import web
from loguru import logger

from supervisor.api.edge import MAX_HEAD, Edge, EdgeSite, routed_path
from supervisor.api.intake import (
    INLINE_JSON,
    Intake,
    allowed_hosts_middleware,
    encode_object,
    host_name,
    parse_object,
    planned_fields,
)
from supervisor.api.web_errors import MODEL_KEY, error_middleware, proxy_error_middleware, public_error
from supervisor.config.settings import ProxyLimits, RequestFields
from supervisor.core import errors
from supervisor.core.errors import BadRequest, LocalllmError, ModelStartFailed, UnknownModel, UpstreamFailed

FAST = dict(header_timeout=0.4, keep_alive=0.4, body_timeout=0.4)


def app_for(
    intake: Intake,
    hold: asyncio.Event | None = None,
    hosts: list[str] | None = None,
    raises: LocalllmError | None = None,
    redact: bool = True,
) -> web.Application:
    """A JSON route read as the proxy reads it, /health, and /fail, which raises ``raises``."""
    middlewares = [proxy_error_middleware if redact else error_middleware]
    if hosts:
        middlewares.append(allowed_hosts_middleware(hosts))
    app = web.Application(middlewares=middlewares)

    async def chat(request: web.Request) -> web.Response:
        async with intake.body_of(request) as body:
            payload = await parse_object(body)
            if payload.get("hold") and hold is not None:
                await hold.wait()
            return web.json_response({"got": len(body)})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def fail(request: web.Request) -> web.Response:
        request[MODEL_KEY] = "llama"
        raise raises

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    app.router.add_get("/fail", fail)
    return app


@contextlib.asynccontextmanager
async def serving(limits: ProxyLimits, **app_options):
    """The app on an EdgeSite on a free loopback port: yields (port, edge, intake)."""
    edge, intake = Edge(limits), Intake(limits)
    runner = edge.runner(app_for(intake, **app_options), shutdown_timeout=0.5)
    await runner.setup()
    site = EdgeSite(runner, edge, "127.0.0.1", 0)
    await site.start()
    try:
        yield site.port, edge, intake
    finally:
        await runner.cleanup()


async def exchange(port: int, raw: bytes, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """Send ``raw`` on a new connection; the status, headers and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        return await asyncio.wait_for(answer_on(reader), timeout)
    finally:
        writer.close()
        await writer.wait_closed()


async def answer_on(reader: asyncio.StreamReader) -> tuple[int, dict, bytes]:
    """One answer, read by its Content-Length (the server may hold the connection open a while after it)."""
    status, headers, _ = parse(await reader.readuntil(b"\r\n\r\n"))
    return status, headers, await reader.readexactly(int(headers["content-length"]))


def parse(answer: bytes) -> tuple[int, dict, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def post(body: bytes, content_type: str | None = "application/json", extra: str = "") -> bytes:
    typed = f"Content-Type: {content_type}\r\n" if content_type is not None else ""
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n{typed}Content-Length: {len(body)}\r\n"
        f"Connection: close\r\n{extra}\r\n"
    ).encode() + body


async def closed_after(reader: asyncio.StreamReader, started: float, timeout: float = 5.0) -> tuple[float, bytes]:
    data = await asyncio.wait_for(reader.read(), timeout)
    return time.monotonic() - started, data


def test_a_client_that_trickles_its_head_is_answered_408_and_dropped_at_the_header_deadline():
    async def scenario():
        async with serving(ProxyLimits(**FAST)) as (port, edge, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()

            async def trickle():
                for byte in b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: yes":
                    writer.write(bytes([byte]))
                    await asyncio.sleep(0.05)

            trickling = asyncio.create_task(trickle())
            seconds, data = await closed_after(reader, started)
            trickling.cancel()
            writer.close()
            status, headers, body = parse(data)
            assert status == 408 and headers["connection"] == "close"
            assert json.loads(body)["error"]["code"] == "request_timeout"
            assert 0.35 <= seconds < 1.5  # trickled bytes do not push the deadline back
            await asyncio.sleep(0.05)
            assert not edge.open

    asyncio.run(scenario())


def test_a_connection_that_sends_nothing_is_dropped_at_the_header_deadline():
    async def scenario():
        async with serving(ProxyLimits(**FAST)) as (port, _, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            seconds, data = await closed_after(reader, time.monotonic())
            writer.close()
            assert parse(data)[0] == 408 and 0.35 <= seconds < 1.5

    asyncio.run(scenario())


def test_a_head_that_arrives_slowly_but_in_time_is_served():
    async def scenario():
        async with serving(ProxyLimits(header_timeout=1.0, keep_alive=0.3)) as (port, _, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for part in (b"GET /health HTTP/1.1\r\n", b"Host: localhost\r\n", b"Connection: close\r\n\r\n"):
                writer.write(part)
                await asyncio.sleep(0.2)
            status, _, body = parse(await asyncio.wait_for(reader.read(), 5))
            writer.close()
            assert status == 200 and json.loads(body) == {"status": "ok"}

    asyncio.run(scenario())


def test_keep_alive_closes_an_idle_connection_and_a_later_heads_deadline_starts_at_its_first_byte():
    async def scenario():
        async with serving(ProxyLimits(header_timeout=0.6, keep_alive=0.4)) as (port, _, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            request = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
            for _ in range(2):  # idle just under keep_alive, then a head over most of header_timeout: both fine
                writer.write(request[:10])
                await asyncio.sleep(0.45)
                writer.write(request[10:])
                await asyncio.wait_for(reader.readuntil(b'{"status": "ok"}'), 5)
                await asyncio.sleep(0.3)
            seconds, data = await closed_after(reader, time.monotonic() - 0.3)
            writer.close()
            assert data == b"" and 0.35 <= seconds < 1.5  # idle past keep_alive: closed without an answer

    asyncio.run(scenario())


def test_a_head_larger_than_max_head_gets_431():
    async def scenario():
        async with serving(ProxyLimits()) as (port, _, _):
            headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"x" * 4000) for i in range(MAX_HEAD // 4000 + 2))
            status, _, body = await exchange(port, b"GET /health HTTP/1.1\r\nHost: localhost\r\n" + headers)
            assert status == 431 and json.loads(body)["error"]["code"] == "request_header_too_large"

    asyncio.run(scenario())


@pytest.mark.parametrize("expect", [b"", b"Expect: x\r\n", b"Expect: \xe4100-continue\r\n"])
@pytest.mark.parametrize("target", [b"/v1/chat/completions", b"localhost:443"])
def test_connect_gets_a_405_error_object_whatever_its_expect_header(target, expect):
    """No router can route CONNECT's target: before, an Expect header met aiohttp's text 417, or a 500."""

    async def scenario():
        async with serving(ProxyLimits()) as (port, _, _):
            raw = b"CONNECT %s HTTP/1.1\r\nHost: localhost\r\n%sContent-Length: 2\r\n\r\n{}" % (target, expect)
            status, headers, body = await exchange(port, raw)
            assert (status, headers["allow"]) == (405, "GET, HEAD, POST")
            assert json.loads(body)["error"]["code"] == "method_not_allowed"

    asyncio.run(scenario())


def test_at_the_connection_cap_the_longest_waiting_connection_makes_room():
    async def scenario():
        async with serving(ProxyLimits(max_connections=4, header_timeout=30)) as (port, edge, _):
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(6)]
            await asyncio.sleep(0.1)
            assert len(edge.open) == 4
            oldest_reader = idle[0][0]
            assert await asyncio.wait_for(oldest_reader.read(), 2) == b""  # closed to make room
            status, _, _ = await exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert status == 200
            for _, writer in idle:
                writer.close()

    asyncio.run(scenario())


def test_at_the_connection_cap_with_every_connection_busy_a_new_one_gets_503():
    async def scenario():
        hold = asyncio.Event()
        async with serving(ProxyLimits(max_connections=2), hold=hold) as (port, edge, _):
            busy = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            for _, writer in busy:
                writer.write(post(b'{"hold": true}'))
            await asyncio.sleep(0.2)
            status, headers, body = await exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == 503 and headers["retry-after"] == "1"
            assert json.loads(body)["error"]["code"] == "too_many_connections"
            hold.set()
            for reader, writer in busy:
                assert parse(await asyncio.wait_for(reader.read(), 5))[0] == 200
                writer.close()

    asyncio.run(scenario())


def test_a_body_that_would_exceed_the_budget_gets_503_before_a_byte_of_it_is_read():
    async def scenario():
        hold = asyncio.Event()
        limits = ProxyLimits(max_body=1000, body_budget=1500)
        async with serving(limits, hold=hold) as (port, _, intake):
            holder_reader, holder = await asyncio.open_connection("127.0.0.1", port)
            big = b'{"hold": true, "pad": "' + b"x" * 900 + b'"}'
            holder.write(post(big))
            await asyncio.sleep(0.2)
            assert intake.budget.used == len(big)
            # Only the head: the answer comes without the body, which is never sent.
            head_only = post(b"y" * 800)[:-800]
            status, headers, body = await exchange(port, head_only, timeout=2)
            assert status == 503 and headers["retry-after"] == "2" and headers["connection"] == "close"
            error = json.loads(body)["error"]
            assert error == {
                "message": "the proxy is receiving too many large request bodies at once; try again in 2s",
                "type": "server_error",
                "param": None,
                "code": "body_budget_exceeded",
            }
            status, _, body = await exchange(port, post(b'{"a": 1}'))  # a small one still fits
            assert status == 200 and json.loads(body) == {"got": 8}
            hold.set()
            assert parse(await asyncio.wait_for(holder_reader.read(), 5))[0] == 200
            holder.close()
            await asyncio.sleep(0.05)
            assert intake.budget.used == 0

    asyncio.run(scenario())


def test_bodies_without_a_size_or_above_max_body_or_too_slow_are_refused():
    async def scenario():
        async with serving(ProxyLimits(max_body=100, **FAST)) as (port, _, _):
            chunked = (
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
            )
            status, _, body = await exchange(port, chunked)
            assert status == 411 and json.loads(body)["error"]["code"] == "length_required"
            status, _, body = await exchange(port, post(b"z" * 101)[:-101])  # refused on its Content-Length
            assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
            started = time.monotonic()
            status, _, body = await exchange(port, post(b'{"model": "m"}')[:-4])  # the body stops short
            assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
            assert 0.35 <= time.monotonic() - started < 3

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "content_type, accepted",
    [
        ("application/json", True),
        ("Application/JSON; charset=UTF-8", True),
        ('application/json;charset="utf-8"', True),
        (None, False),
        ("text/plain", False),
        ("text/plain; charset=utf-8", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
        ("application/json; charset=latin-1", False),
        ("application/json; boundary=x", False),
        ("application/jsonp", False),
    ],
)
def test_a_json_route_takes_only_application_json(content_type, accepted):
    async def scenario():
        async with serving(ProxyLimits()) as (port, _, _):
            status, _, body = await exchange(port, post(b'{"a": 1}', content_type))
            if accepted:
                assert status == 200, body
            else:
                error = json.loads(body)["error"]
                assert status == 415 and error["code"] == "unsupported_media_type"
                assert "send 'Content-Type: application/json'" in error["message"]

    asyncio.run(scenario())


def test_a_compressed_body_is_refused():
    async def scenario():
        async with serving(ProxyLimits()) as (port, _, _):
            status, _, body = await exchange(port, post(b"\x1f\x8b", extra="Content-Encoding: gzip\r\n"))
            assert status == 415 and "Content-Encoding 'gzip'" in json.loads(body)["error"]["message"]

    asyncio.run(scenario())


def test_with_allowed_hosts_other_hosts_get_421():
    async def scenario():
        async with serving(ProxyLimits(), hosts=["llm.example.com", "[::1]"]) as (port, _, _):
            for host, status in [
                ("llm.example.com", 200),
                ("LLM.example.com:8081", 200),
                ("[::1]:8081", 200),
                ("evil.example.com", 421),
                ("localhost", 421),
                ("", 421),
            ]:
                raw = f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
                answer = await exchange(port, raw)
                assert answer[0] == status, (host, answer)
                if status == 421:
                    assert json.loads(answer[2])["error"]["code"] == "host_not_allowed"

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "header, name",
    [
        ("llm.example.com:8081", "llm.example.com"),
        ("LOCALHOST", "localhost"),
        ("[::1]:8081", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("", ""),
    ],
)
def test_host_name(header, name):
    assert host_name(header) == name


CHAT, EMBED = "/v1/chat/completions", "/v1/embeddings"
DEFAULT = RequestFields()


@pytest.mark.parametrize(
    "payload, path, fields, expected",
    [
        # nothing to change: None, so the body goes as it came
        ({"model": "m", "max_tokens": 16}, CHAT, DEFAULT, None),
        ({"model": "m", "n_predict": 512, "max_tokens": 4}, CHAT, DEFAULT, None),
        ({"model": "m", "input": "x"}, EMBED, DEFAULT, None),
        # dropped fields
        (
            {"model": "m", "max_tokens": 8, "id_slot": 0, "cache_prompt": True},
            CHAT,
            DEFAULT,
            {"model": "m", "max_tokens": 8},
        ),
        ({"model": "m", "input": "x", "id_slot": 1}, EMBED, DEFAULT, {"model": "m", "input": "x"}),
        ({"model": "m", "max_tokens": 8, "id_slot": 0}, CHAT, RequestFields(drop=[]), None),
        # lengths capped at the model's context (512 here) or at max_tokens
        (
            {"model": "m", "n_predict": -1, "ignore_eos": True},
            CHAT,
            DEFAULT,
            {"model": "m", "n_predict": 512, "ignore_eos": True},
        ),
        ({"model": "m", "max_tokens": 10**9}, CHAT, DEFAULT, {"model": "m", "max_tokens": 512}),
        (
            {"model": "m", "max_completion_tokens": 600, "max_tokens": 5},
            CHAT,
            DEFAULT,
            {"model": "m", "max_completion_tokens": 512, "max_tokens": 5},
        ),
        ({"model": "m", "max_tokens": 100}, CHAT, RequestFields(max_tokens=64), {"model": "m", "max_tokens": 64}),
        ({"prompt": "p", "model": "m", "max_tokens": 512}, "/v1/completions", DEFAULT, None),
        # no length at all (or only nulls): one is added
        ({"model": "m"}, CHAT, DEFAULT, {"model": "m", "max_tokens": 512}),
        ({"model": "m", "max_tokens": None}, CHAT, DEFAULT, {"model": "m", "max_tokens": 512}),
        ({"model": "m", "max_tokens": None, "n_predict": 3}, CHAT, DEFAULT, {"model": "m", "n_predict": 3}),
    ],
)
def test_planned_fields(payload, path, fields, expected):
    before = json.dumps(payload)
    assert planned_fields(payload, path, fields, context=512) == expected
    assert json.dumps(payload) == before  # the parsed request itself is left alone


@pytest.mark.parametrize("value", ["-1", 1.5, True, [1], {"n": 1}])
def test_a_length_that_is_not_an_integer_is_a_bad_request(value):
    with pytest.raises(BadRequest, match="field 'max_tokens' must be an integer"):
        planned_fields({"model": "m", "max_tokens": value}, CHAT, DEFAULT, context=512)


def test_large_bodies_are_parsed_and_written_off_the_event_loop_with_the_same_result():
    payload = {"model": "m", "messages": [{"role": "user", "content": "é" * (INLINE_JSON // 2 + 10)}]}
    body = json.dumps(payload, ensure_ascii=False).encode()
    assert len(body) > INLINE_JSON

    async def scenario():
        threads = []
        original = asyncio.to_thread

        async def spy(func, *args):
            threads.append(func)
            return await original(func, *args)

        asyncio.to_thread = spy
        try:
            parsed = await parse_object(body)
            written = await encode_object(parsed, len(body))
        finally:
            asyncio.to_thread = original
        assert parsed == payload and json.loads(written) == payload and len(threads) == 2
        assert await parse_object(b'{"a": 1}') == {"a": 1}  # small: on the loop
        assert len(threads) == 2

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "body, message", [(b"{nope", "request body is not valid JSON"), (b"[1]", "request body must be a JSON object")]
)
def test_a_body_that_is_not_a_json_object_is_a_bad_request(body, message):
    with pytest.raises(BadRequest, match=message):
        asyncio.run(parse_object(body))


def test_a_number_json_cannot_carry_is_a_bad_request_when_the_body_is_rewritten():
    with pytest.raises(BadRequest, match="number JSON cannot carry"):
        asyncio.run(encode_object({"temperature": float("inf")}, 10))


# Whether each error's message may reach a proxy client as it is. A new class must be decided on here:
# no when its message could carry what a container printed, a host path, the Docker socket or an address.
CLIENT_SAFE = {
    "LocalllmError": False,
    "ConfigError": False,
    "BadRequest": True,
    "UnknownModel": True,
    "DockerUnavailable": False,
    "ImageNotFound": False,
    "DockerFailure": False,
    "ModelStartFailed": False,
    "UpstreamFailed": False,
    "UpstreamTimeout": False,  # its public part names the model and the deadline, never an address
    "ShuttingDown": True,
    "ControlUnreachable": False,
    "CannotListen": False,
    "AlreadyRunning": False,
    "ModelTooLarge": True,
    "Overloaded": True,
    "QueueFull": True,
    "QueueTimeout": True,
    "UpstreamBusy": True,
    "ConcurrencyLimit": True,  # a count of our own limit
    "RouteNotServed": True,  # names the route and the backend, from the config
    "BodyBudgetExceeded": True,
    "TooManyConnections": True,
    "ModelGaveUp": False,
    "StateWriteFailed": False,
    "ApplyRefused": False,
    "Conflict": False,
    "ModelBusy": False,
    "ModelNotRunning": False,
    "ApplyFailed": False,
    "InvalidToken": False,
    "Forbidden": False,
    "InvalidApiKey": True,
    "EdgeRefusal": True,
    "UnsupportedMediaType": True,
    "LengthRequired": True,
    "RequestTooLarge": True,
    "RequestTimeout": True,
    "HeadTooLarge": True,
    "HostNotAllowed": True,
    "ModelFileUnreadable": False,
    "OllamaFailure": False,
    "ModelStayedBusy": False,
    "RemoteError": False,
}


def error_classes() -> dict[str, type[LocalllmError]]:
    return {
        name: cls
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, LocalllmError) and cls.__module__ == errors.__name__
    }


def test_every_error_class_is_decided_on_for_proxy_clients():
    classes = error_classes()
    assert sorted(classes) == sorted(CLIENT_SAFE), "decide in CLIENT_SAFE whether a new class may reach clients"
    assert {name: cls.client_safe for name, cls in classes.items()} == CLIENT_SAFE


def instance_of(cls: type[LocalllmError], secret: str) -> LocalllmError:
    """An instance of ``cls`` whose message carries ``secret``."""
    special = {
        "ConfigError": lambda: cls(secret, ["x"]),
        "UnknownModel": lambda: cls(secret, []),
        "ModelStartFailed": lambda: cls("llama", "server exited", 1, secret),
        "ApplyFailed": lambda: cls(secret, {"detail": secret}),
        "Forbidden": lambda: cls(secret, "admin"),
        "ModelFileUnreadable": lambda: cls(secret, "not a GGUF file"),
        "OllamaFailure": lambda: cls("llama", secret),
        "RemoteError": lambda: cls(secret, "conflict"),
    }
    if name := next((n for n in special if cls.__name__ == n), None):
        return special[name]()
    if "retry_after" in inspect.signature(cls).parameters:
        return cls(secret, retry_after=3)
    return cls(secret)


@pytest.mark.parametrize("name", sorted(CLIENT_SAFE))
def test_a_proxy_client_sees_a_redacted_error_only_as_a_summary_and_an_error_id(name):
    secret = "/srv/models/secret.gguf --- last log lines --- MARKER-7f3a unix:///var/run/docker.sock 127.0.0.1:28101"
    error = instance_of(error_classes()[name], secret)
    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING", format="{message} {extra}")
    try:
        shown = public_error(error, model="llama")["error"]
    finally:
        logger.remove(sink)
    assert shown["code"] == error.code and shown["type"] == error.openai_type
    if error.client_safe:
        assert shown == error.to_json()["error"] and not lines
        return
    assert set(shown) == {"message", "type", "param", "code"} and "MARKER" not in json.dumps(shown)
    error_id = shown["message"].split("(error id ")[1].split(")")[0]
    assert len(error_id) == 10 and "localllmctl status" in shown["message"]
    assert "'llama'" in shown["message"]
    [line] = lines
    assert error_id in line and "MARKER-7f3a" in line  # the operator's log has the whole message under the id


def test_the_proxy_redacts_an_error_and_the_control_api_keeps_it():
    tail = "llama_model_load: error loading model: /srv/models/llama.gguf MARKER-55"

    async def scenario(redact: bool) -> dict:
        error = ModelStartFailed("llama", "server exited during startup", 1, tail)
        async with serving(ProxyLimits(), raises=error, redact=redact) as (port, _, _):
            status, _, body = await exchange(port, b"GET /fail HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert status == 503
            return json.loads(body)["error"]

    proxied = asyncio.run(scenario(redact=True))
    assert proxied["code"] == "model_start_failed" and "MARKER-55" not in proxied["message"]
    assert proxied["message"].startswith("model 'llama' failed to start (error id ")
    control = asyncio.run(scenario(redact=False))
    assert "MARKER-55" in control["message"] and "exit code 1" in control["message"]


def test_what_upstream_failures_tell_a_client():
    assert public_error(
        UpstreamFailed(
            "model 'm' broke off the stream: Connection to 127.0.0.1:28101 lost",
            public="model 'm' broke off the stream",
        ),
        "m",
    )["error"]["message"].startswith("model 'm' broke off the stream (error id ")
    assert (
        public_error(UnknownModel("gpt-9", ["tiny"]), "x")["error"]
        == UnknownModel("gpt-9", ["tiny"]).to_json()["error"]
    )


@pytest.mark.parametrize(
    "target, path",
    [
        ("/v1/messages?beta=true#x", "/v1/messages"),
        ("//../v1/messages", "//../v1/messages"),  # origin-form: no authority, as aiohttp routes it
        ("/a%2Fb/../c", "/a/b/../c"),
        ("http://host/v1/messages", "/v1/messages"),  # absolute-form
        ("\x01\x02/v1/messages", "/v1/messages"),  # refused by the parser; yarl drops what leads it
        ("/v1/messages\x00\x00", "/v1/messages\x00\x00"),
        ("http://[::1/x", ""),
    ],
)
def test_a_target_is_read_as_the_router_reads_it(target, path):
    assert routed_path(target) == path
