"""The proxy's request path under fuzzing: the real app, on a real loopback listener, before a real Fleet.

``ProxyUnderTest`` runs what the daemon runs in front of its models (``api/proxy.create_proxy_app`` behind
``edge.Edge``, as ``daemon.open_proxy`` opens it) over a Fleet of the unit tests' recording fake
(tests/unit/fleet_harness.py), whose fake llama-servers answer every route of ``routes.MODEL_ROUTES`` on
their UNIX sockets. A case is sent as raw bytes on a TCP connection and its answer is judged:

- a 4xx carries an error object in the route's dialect (OpenAI's, or Anthropic's on /v1/messages routes);
- a 2xx came from the fake model server (forwarded), or from one of the proxy's own GET routes;
- no 5xx is the proxy's own fault: an ``internal_error`` never; 502, 503 or 504 only as an upstream failure,
  timeout or overload (each with its error object), or as the fake server's own answer passed on;
- what reached the fake server respects the proxy's rewrites (lengths capped, fields dropped or forced);
- a stream is complete: it ends as the upstream's did, or with an error event, and its framing is whole;
- the proxy keeps serving: a valid request right after (on the same connection when it stays open) is
  forwarded, and nothing is left held (requests in flight, the body budget, the fleet's tickets).

A finding raises ``Finding``, except the ones ``KNOWN`` lists: their fix lies outside the files this work
could change, so they are counted (``ProxyUnderTest.known``, bench/results/fuzz.json) and reported instead.

A case is written as text (the files of tests/fuzz/corpus, and what the fuzzer mutates)::

    POST /v1/chat/completions           <- the request line (HTTP/1.1 unless it names a version)
    Content-Type: application/json      <- header lines, sent as they are
    @chunked                            <- directives for the harness (never sent), see below
                                        <- a blank line, then the body, sent as it is
    {"model": "a", "messages": []}

Unless ``@raw``, the harness writes the Content-Length (one that is a plain number is replaced by the
body's true length; any other is sent as it is) and a Host. Directives:

- ``@locked``: the proxy with ``daemon.api_keys`` and ``daemon.allowed_hosts`` (``KEY``; hosts 127.0.0.1 and
  localhost) instead of the open one;
- ``@chunked``: the body is sent with ``Transfer-Encoding: chunked``;
- ``@raw``: the head is sent exactly as written (no Content-Length or Host added);
- ``@repeat N``: the body ``A|B|C|D|E`` becomes ``A + B*N + C + D*N + E`` (``A|B`` becomes ``A + B*N``), up to
  just over ``MAX_BODY``: deep nesting, long strings, huge numbers;
- ``@size D``: the body padded with spaces to ``MAX_BODY + D`` bytes (D: -1, 0, +1...);
- ``@header NAME N``: a header NAME whose value is N bytes; ``@name N``: a header whose name is N bytes.

The fake server answers from the body it got: ``{"x_fake": {...}}`` asks it for a ``status``, a ``body``,
``content_type``, ``retry_after``, a stream of ``events`` (strings, sent one write each; ``repeat`` N: the
first N times over, for a first event larger than the proxy holds), or to ``close`` the connection without
an answer; without one it answers JSON (``{"fake": MARK, ...}``, with what it received), or a short chat
stream whose first chunk has no role, for ``"stream": true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from multidict import CIMultiDict

from supervisor.api.edge import MAX_HEAD, Edge, EdgeSite, request_target, routed_path
from supervisor.api.metrics import Metrics
from supervisor.api.model_list import OLLAMA_ROOT_TEXT
from supervisor.api.proxy import Proxy, create_proxy_app
from supervisor.api.routes import MODEL_ROUTES, ROUTES_BY_PATH, Dialect, dialect_of
from supervisor.api.streams import StreamEnd
from supervisor.config.profiles import load_profiles
from supervisor.config.settings import Config, DaemonSettings, ModelEntry
from supervisor.core.backends import ollama
from supervisor.core.containers import servers_dir
from supervisor.core.errors import HTTP_ERROR_CODES, error_codes
from supervisor.core.estimate import LaunchSettings
from supervisor.core.slots import Phase
from supervisor.fleet.events import EventBus
from supervisor.fleet.owner import Fleet
from supervisor.fleet.sizing import Sizing
from supervisor.runtime.container_runtime import ContainerInfo
from supervisor.runtime.upstream import open_session
from tests.unit.fleet_harness import CPU, FakeContainer, FakeOllamaApi, RecordingFakeRuntime, socket_path

OLLAMA_TAG = "tiny:1b"  # model o's tag: the proxy sends it as the model's name
MARK = "fake-upstream"  # in every answer of the fake model server, so a forwarded answer is told from ours
KEY = "k" * 40  # the API key of the locked proxy
MAX_BODY = 1024 * 1024  # the fuzzed proxy's daemon.proxy_limits.max_body: above intake.INLINE_JSON, so both paths run
CONTEXT = 4096  # every model's context: the proxy's default length cap
FORCED = {"temperature": 0.25}  # model f's filters.set_params
STRIPPED = ["logit_bias"]  # model f's filters.strip_params
DROPPED = ("id_slot", "cache_prompt")  # daemon.request_fields.drop (its default)
LENGTH_FIELDS = ("n_predict", "max_tokens", "max_completion_tokens")
GENERATING = ("/v1/chat/completions", "/v1/completions")
LOCAL_GETS = ("/", "/health", "/api/version", "/api/tags", "/v1/models", "/metrics")
READ_TIMEOUT = 10.0  # seconds: an answer slower than this is a finding (the proxy's own deadlines: 1 s at most)
# The proxy's own 5xx codes that are not its fault: the upstream failed or is busy, or the proxy is overloaded.
NOT_OUR_FAULT_5XX = {
    "upstream_failed",
    "upstream_busy",
    "upstream_timeout",
    "body_budget_exceeded",
    "too_many_connections",
    "queue_full",
    "queue_timeout",
}


class Finding(AssertionError):
    """The proxy did what it must not: the case and what happened, in words."""


# -- the fake model server -------------------------------------------------------------------------------------


def _received(payload: object) -> dict:
    """What the fake tells of the body it got, for the oracle to check the proxy's rewrites."""
    if not isinstance(payload, dict):
        return {"object": False}
    return {
        "object": True,
        "model": payload.get("model") if isinstance(payload.get("model"), str) else None,
        "lengths": {name: payload[name] for name in LENGTH_FIELDS if name in payload},
        "keys": sorted(k for k in payload if k in (*DROPPED, *STRIPPED, *FORCED)),
        "forced": {name: payload.get(name) for name in FORCED},
    }


def _default_events(stream_chat: bool) -> list[str]:
    if stream_chat:
        return [
            'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}],"object":"chat.completion.chunk"}\n\n',
            'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"object":"chat.completion.chunk"}\n\n',
            "data: [DONE]\n\n",
        ]
    return ['data: {"choices":[{"text":"hi","index":0,"finish_reason":"stop"}]}\n\n', "data: [DONE]\n\n"]


def add_model_routes(app: web.Application, name: str) -> None:
    """Every route of ``MODEL_ROUTES``, answered as the body's ``x_fake`` says (the module's doc)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            payload = None
        fake = payload.get("x_fake") if isinstance(payload, dict) else None
        fake = fake if isinstance(fake, dict) else {}
        info = {"fake": MARK, "container": name, "path": request.path, "bytes": len(body), **_received(payload)}
        if fake.get("close"):
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(0)
            return web.Response()
        status = fake.get("status")
        status = status if isinstance(status, int) and not isinstance(status, bool) and 200 <= status < 600 else 200
        headers = {}
        if isinstance(fake.get("retry_after"), str):
            headers["Retry-After"] = _header_safe(fake["retry_after"])
        content_type = fake.get("content_type")
        content_type = _header_safe(content_type) if isinstance(content_type, str) else None
        events = fake.get("events")
        streaming = isinstance(payload, dict) and payload.get("stream") is True
        if streaming or isinstance(events, list):
            if not isinstance(events, list):
                events = _default_events(request.path == "/v1/chat/completions")
            times = fake.get("repeat")
            if isinstance(times, int) and events and 1 < times:  # a first event too large to hold (> 1 MiB)
                events = [str(events[0]) * min(times, 4 * MAX_BODY // max(1, len(str(events[0])))), *events[1:]]
            response = web.StreamResponse(
                status=status, headers={**headers, "Content-Type": content_type or "text/event-stream"}
            )
            await response.prepare(request)
            for event in events:
                await response.write(str(event).encode("utf-8", "surrogatepass"))
            await response.write_eof()
            return response
        if isinstance(fake.get("body"), str):
            data = fake["body"].encode("utf-8", "surrogatepass")
        elif status >= 400:
            data = json.dumps({"error": {"message": f"{MARK} says no", "type": "x", "code": status}}).encode()
        else:
            data = json.dumps(info).encode()
        headers["Content-Type"] = content_type or "application/json"
        return web.Response(status=status, body=data, headers=headers)

    for route in MODEL_ROUTES:
        app.router.add_post(route.path, answer)


def fake_llama_server(name: str) -> web.Application:
    """A llama-server of model ``name`` as far as the proxy looks: ``/health``, and every model route."""

    async def healthy(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application(client_max_size=4 * MAX_BODY)
    app.router.add_get("/health", healthy)
    add_model_routes(app, name)
    return app


@dataclass
class FakeOllama(FakeOllamaApi):
    """The fake Ollama server, which also answers the model routes (as Ollama's OpenAI-compatible API does)."""

    def app(self) -> web.Application:
        app = super().app()
        app._client_max_size = 4 * MAX_BODY
        add_model_routes(app, "ollama")
        return app


def _header_safe(text: str) -> str:
    """A header value aiohttp lets a server send (no control characters), which may still be odd: '²'."""
    return "".join(c for c in text if 32 <= ord(c) < 256 and ord(c) != 127)[:200]


@dataclass
class FuzzRuntime(RecordingFakeRuntime):
    """The recording fake, whose llama-servers answer every model route (``fake_llama_server``)."""

    ollama: FakeOllamaApi = field(default_factory=lambda: FakeOllama(store={OLLAMA_TAG}))

    async def run(self, spec) -> ContainerInfo:
        self.calls.append(("run", spec.name))
        app = self.ollama.app() if spec.model == ollama.SERVER_LABEL else fake_llama_server(spec.model)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.UnixSite(runner, socket_path(spec)).start()
        info = ContainerInfo(spec.name + "-id", spec.name, "running", None, False, spec.labels())
        self.containers[info.id] = FakeContainer(info, [], runner)
        self.specs[info.id] = spec
        return info


# -- a case: its text, and the bytes sent -------------------------------------------------------------------------


@dataclass
class Case:
    method: str
    target: str  # as sent (latin-1)
    wire: bytes  # the request as it goes on the connection
    body: bytes  # the body as the server receives it (unchunked)
    locked: bool = False
    chunked: bool = False
    raw: bool = False

    def show(self, limit: int = 600) -> str:
        wire = self.wire if len(self.wire) <= limit else self.wire[:limit] + b"...(%d bytes)" % len(self.wire)
        return f"{'locked' if self.locked else 'open'} proxy, request {wire!r}"


def _int(text: bytes, default: int = 0) -> int:
    try:
        return int(text.strip())
    except ValueError:
        return default


def decode_case(data: bytes, host: str = "127.0.0.1") -> Case:
    """The request a case's text says (the module's doc); any bytes make one."""
    head, _, body = data.partition(b"\n\n")
    lines = [line.rstrip(b"\r") for line in head.split(b"\n")]
    request_line = lines[0] or b"POST /v1/chat/completions"
    headers: list[bytes] = []
    locked = chunked = raw = False
    repeat: int | None = None
    size: int | None = None
    for line in lines[1:]:
        if not line.startswith(b"@"):
            headers.append(line)
            continue
        word, _, arg = line[1:].partition(b" ")
        if word == b"locked":
            locked = True
        elif word == b"chunked":
            chunked = True
        elif word == b"raw":
            raw = True
        elif word == b"repeat":
            repeat = max(0, _int(arg))
        elif word == b"size":
            size = _int(arg)
        elif word == b"header":
            name, _, count = arg.partition(b" ")
            headers.append((name or b"X-Fill") + b": " + b"v" * min(max(0, _int(count)), 128 * 1024))
        elif word == b"name":
            headers.append(b"X" * min(max(1, _int(arg)), 128 * 1024) + b": v")
    if repeat is not None:
        body = _repeated(body, repeat)
    if size is not None:
        want = max(0, MAX_BODY + max(-MAX_BODY, min(size, 16)))
        body = body[:want] + b" " * (want - len(body))
    parts = request_line.split(b" ")
    if len(parts) == 1:
        parts.append(b"/")
    if len(parts) == 2:
        parts.append(b"HTTP/1.1")
        request_line = b" ".join(parts)
    method = parts[0].decode("latin-1").lstrip("\r\n")  # a CR before: let pass
    target = request_target(request_line)
    if not raw:
        lengths = [h for h in headers if h.partition(b":")[0].strip().lower() == b"content-length"]
        plain = [h for h in lengths if h.partition(b":")[2].strip().isdigit()]
        headers = [h for h in headers if h not in plain]
        if not any(h.partition(b":")[0].strip().lower() == b"host" for h in headers):
            headers.append(b"Host: " + host.encode())
        if chunked:
            if not any(h.partition(b":")[0].strip().lower() == b"transfer-encoding" for h in headers):
                headers.append(b"Transfer-Encoding: chunked")
        elif len(lengths) == len(plain):
            headers.append(b"Content-Length: %d" % len(body))
    framed = _chunks(body) if chunked else body
    wire = request_line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + framed
    return Case(method, target, wire, body, locked, chunked, raw)


def _repeated(body: bytes, count: int) -> bytes:
    parts = body.split(b"|", 4)
    if len(parts) == 1:
        return body
    parts += [b""] * (5 - len(parts))
    a, b, c, d, e = parts
    fixed, per = len(a) + len(c) + len(e), len(b) + len(d)
    if per:
        count = min(count, max(0, (MAX_BODY + 2 - fixed) // per))
    return a + b * count + c + d * count + e


def _chunks(body: bytes) -> bytes:
    pieces = [body[: len(body) // 2], body[len(body) // 2 :]] if body else []
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


# -- the answer -----------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    reason: str
    headers: CIMultiDict
    body: bytes
    complete: bool  # its framing was whole (Content-Length read, or the last chunk)

    def json(self) -> object:
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError):
            return None

    def show(self, limit: int = 600) -> str:
        body = self.body if len(self.body) <= limit else self.body[:limit] + b"..."
        return f"{self.status} {self.reason} {dict(self.headers)} {body!r}"


async def read_answer(reader: asyncio.StreamReader, head_only: bool = False) -> Answer | None:
    """One HTTP/1.1 answer (interim 1xx ones skipped); None when the connection closed before any."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, _, rest = status_line.partition(" ")
        code, _, reason = rest.partition(" ")
        status = int(code)
        headers: CIMultiDict = CIMultiDict()
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers.add(name.strip(), value.strip())
        if status >= 200:
            break
    if head_only or status in (204, 304):
        return Answer(status, reason, headers, b"", True)
    if headers.get("Transfer-Encoding", "").lower() == "chunked":
        body, complete = b"", False
        with contextlib.suppress(asyncio.IncompleteReadError, ValueError):
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    complete = True
                    break
                body += await reader.readexactly(size)
                await reader.readexactly(2)
        return Answer(status, reason, headers, body, complete)
    if "Content-Length" in headers:
        length = int(headers["Content-Length"])
        try:
            return Answer(status, reason, headers, await reader.readexactly(length), True)
        except asyncio.IncompleteReadError as exc:
            return Answer(status, reason, headers, exc.partial, False)
    return Answer(status, reason, headers, await reader.read(), True)


# -- the proxy under test -----------------------------------------------------------------------------------------


class ProxyUnderTest:
    """Two proxies (open, and locked by API keys and allowed hosts) over one fleet of fake llama.cpp models:

    ``a`` (alias ``alias-a``, the ``default_model``), ``f`` (filters: ``logit_bias`` stripped, ``temperature``
    forced; ``max_concurrent`` 1; loading progress as reasoning), ``cold`` (not preloaded: a request starts it),
    and ``o``, an Ollama model (its server answers 503 as "busy", and some routes are not served for it).
    """

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="localllm-fuzz-"))  # short: socket paths fit in 108 bytes
        self.stack = contextlib.AsyncExitStack()
        self.ports: dict[bool, int] = {}
        self.proxies: dict[bool, Proxy] = {}
        self.cases = 0
        self.known: Counter[str] = Counter()  # KNOWN findings met, by name

    async def __aenter__(self) -> ProxyUnderTest:
        session = await self.stack.enter_async_context(open_session(servers_dir(self.tmp)))
        entries = []
        for name, extra in {
            "a": {"aliases": ["alias-a"], "preload": True},
            "f": {
                "filters": {"strip_params": STRIPPED, "set_params": FORCED},
                "max_concurrent": 1,
                "loading_progress": "reasoning",
                "preload": True,
            },
            "cold": {},
        }.items():
            (self.tmp / f"{name}.gguf").write_bytes(b"GGUF")
            entries.append(ModelEntry(name=name, gguf=self.tmp / f"{name}.gguf", ttl=0, **extra))
        entries.append(ModelEntry(name="o", backend="ollama", tag=OLLAMA_TAG, ttl=0, preload=True))
        # a budget that holds any one body parsed (intake.parsed_size: 64 MiB at most for 1 MiB of brackets)
        limits = {"max_body": MAX_BODY, "body_budget": 128 * MAX_BODY, "body_timeout": 0.25, "header_timeout": 1}
        daemon = {
            "instance": "fuzz",
            "state_dir": str(self.tmp),
            "stop_grace": 0,
            "min_residency": 0,
            "startup_timeout": 5,
            "proxy_limits": limits,
        }
        config = Config(profile=CPU, models=entries, daemon=daemon, default_model="a")
        sizings = {e.name: Sizing(LaunchSettings(context=CONTEXT), None, None, None, "fuzz", 2**20) for e in entries}
        self.runtime = FuzzRuntime()
        self.fleet = Fleet(config, load_profiles()[CPU], self.runtime, session, sizings, None, None, EventBus())
        self.stack.push_async_callback(self.fleet.shutdown)
        await self.fleet.start_models(["a", "f", "o"])
        for name in ("a", "f", "o"):
            instance = self.fleet.instances[name]
            if self.fleet.phase(instance) is not Phase.READY:  # a socket path over 108 bytes, say
                raise RuntimeError(f"the fuzzed fleet's model {name} did not start: {instance.error}")
        locked = DaemonSettings(
            **{**daemon, "api_keys": [KEY], "allowed_hosts": ["127.0.0.1", "localhost"]},
        )
        for is_locked, settings in ((False, config.daemon), (True, locked)):
            app = create_proxy_app(self.fleet, session, settings, Metrics(self.fleet))
            self.proxies[is_locked] = next(
                r.handler.__self__
                for r in app.router.routes()
                if isinstance(getattr(r.handler, "__self__", None), Proxy)
            )
            edge = Edge(settings.proxy_limits)
            runner = edge.runner(app, shutdown_timeout=1)
            await runner.setup()
            self.stack.push_async_callback(runner.cleanup)
            site = EdgeSite(runner, edge, "127.0.0.1", 0)
            await site.start()
            self.ports[is_locked] = site.port
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            await self.stack.aclose()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- one case --

    async def exchange(self, case: Case) -> tuple[Answer | None, asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.ports[case.locked], limit=2**24)
        writer.write(case.wire)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                answer = await read_answer(reader, head_only=case.method == "HEAD")
        except TimeoutError:
            writer.close()
            raise Finding(f"no answer within {READ_TIMEOUT:g}s to: {case.show()}") from None
        except ConnectionError:
            answer = None
        return answer, reader, writer

    async def check(self, data: bytes) -> Answer | None:
        """Send the case ``data`` says, judge its answer, then check that the proxy keeps serving; Finding if not."""
        self.cases += 1
        case = decode_case(data)
        answer, reader, writer = await self.exchange(case)
        try:
            problems = judge(case, answer)
            causes = {problem: known_cause(case, answer, problem) for problem in problems}
            unexplained = [problem for problem, cause in causes.items() if cause is None]
            if unexplained:
                raise Finding(f"{'; '.join(unexplained)}\n  case: {case.show()}\n  answer: {answer and answer.show()}")
            self.known.update(set(causes.values()))
            await self.still_serving(case, answer, reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await self.nothing_held(case)
        return answer

    async def still_serving(
        self, case: Case, answer: Answer | None, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A valid request after the case is forwarded: on its connection if that stays open, else on a new one."""
        valid = decode_case(valid_case(case.locked))
        # A raw case may have sent more than its Content-Length said: the rest is a request of its own.
        reuse = answer is not None and answer.complete and answer.headers.get("Connection", "").lower() != "close"
        reuse = reuse and not case.raw and case.method != "CONNECT"  # CONNECT has no body: the case's is a request
        if reuse and not reader.at_eof():
            writer.write(valid.wire)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    follow = await read_answer(reader)
            except (TimeoutError, ConnectionError):
                follow = None
            if follow is not None:  # None: the server closed it after the case (a lingering body, say), as it may
                if follow.status != 200 or (follow.json() or {}).get("fake") != MARK:
                    raise Finding(
                        f"a valid request on the same connection after the case was not forwarded: {follow.show()}"
                        f"\n  case: {case.show()}\n  answer: {answer and answer.show()}"
                    )
                return
        follow, _, fresh = await self.exchange(valid)
        fresh.close()
        if follow is None or follow.status != 200 or (follow.json() or {}).get("fake") != MARK:
            raise Finding(
                f"the proxy stopped serving: a valid request after the case got {follow and follow.show()}"
                f"\n  case: {case.show()}"
            )

    async def nothing_held(self, case: Case) -> None:
        """Once the case's handler ended: no request in flight or waiting, no body budget held."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3
        while True:
            held = self.held()
            if not held:
                return
            if loop.time() > deadline:
                raise Finding(f"after the case, still held: {held}\n  case: {case.show()}")
            await asyncio.sleep(0.005)

    def held(self) -> dict:
        found = {}
        for locked, proxy in self.proxies.items():
            if proxy.intake.budget.used:
                found[f"body budget ({'locked' if locked else 'open'})"] = proxy.intake.budget.used
            if +proxy.active:
                found[f"active ({'locked' if locked else 'open'})"] = dict(+proxy.active)
        for instance in self.fleet.instances.values():
            view = self.fleet.describe(instance)
            if view["in_flight"] or view["waiting"]:
                found[instance.name] = {"in_flight": view["in_flight"], "waiting": view["waiting"]}
        return found


def valid_case(locked: bool = False) -> bytes:
    key = b"Authorization: Bearer " + KEY.encode() + b"\n" if locked else b""
    directive = b"@locked\n" if locked else b""
    return (
        b"POST /v1/chat/completions\nContent-Type: application/json\n" + key + directive + b"\n"
        b'{"model":"a","messages":[{"role":"user","content":"hi"}]}'
    )


# -- the oracle -----------------------------------------------------------------------------------------------------


def server_path(target: str) -> str | None:
    """The path aiohttp routes ``target`` by (percent-decoded, as ``request.path``); None when unsure."""
    return routed_path(target) or None


def error_problems(found: object, dialect: Dialect | None) -> list[str]:
    """What is wrong with ``found`` as an error object of ``dialect`` (None: either dialect will do)."""
    if not isinstance(found, dict):
        return ["the error answer is not a JSON object"]
    inner = found.get("error")
    anthropic = found.get("type") == "error"
    if dialect is Dialect.ANTHROPIC and not anthropic:
        return ["an error on an Anthropic route is not in Anthropic's shape"]
    if dialect is Dialect.OPENAI and anthropic:
        return ["an error on an OpenAI route is in Anthropic's shape"]
    if (
        not isinstance(inner, dict)
        or not isinstance(inner.get("message"), str)
        or not isinstance(inner.get("type"), str)
    ):
        return ["the error object lacks error.message or error.type"]
    if not anthropic and "code" not in inner:
        return ["the OpenAI error object lacks error.code"]
    return []


def directive_of(case: Case) -> dict:
    """What the case's body asks of the fake server (``x_fake``), as the fake reads it; {} for nothing."""
    try:
        payload = json.loads(case.body)
    except (ValueError, RecursionError):
        return {}
    fake = payload.get("x_fake") if isinstance(payload, dict) else None
    return fake if isinstance(fake, dict) else {}


def judge(case: Case, answer: Answer | None) -> list[str]:
    """What is wrong with ``answer`` to ``case`` (nothing: an empty list)."""
    if answer is None:
        return ["the connection closed without an answer"]
    path = server_path(case.target) if case.method != "CONNECT" else None  # a tunnel: routed by no path
    route = ROUTES_BY_PATH.get(path) if path else None
    dialect = dialect_of(path) if path is not None else None
    found = answer.json()
    directive = directive_of(case)
    directed = bool(directive.keys() & {"status", "events", "body", "content_type"})
    forwarded = (isinstance(found, dict) and found.get("fake") == MARK) or MARK.encode() in answer.body
    forwarded = forwarded or (directed and answer.status == directive.get("status", 200))
    problems = []
    if not answer.complete:
        problems.append("the answer's body was cut short (its framing is not whole)")
    head = case.wire.split(b"\r\n\r\n", 1)[0]
    if len(head) > MAX_HEAD and answer.status != 431:
        problems.append(f"a head of {len(head)} bytes (edge.MAX_HEAD: {MAX_HEAD}) got {answer.status}, not 431")
    if case.method == "HEAD":  # an answer to HEAD has no body to judge
        return problems
    status = answer.status
    ours = None if forwarded else _our_error(found, status)  # the proxy's own error answer, not the fake's
    if ours:
        problems += error_problems(found, None if status in (408, 431) else dialect)  # the edge's: OpenAI's shape
        if ours == "internal_error":
            problems.append(f"a {status} internal_error: a bug in the proxy")
        elif (
            status >= 500 and ours not in NOT_OUR_FAULT_5XX and not (ours == "anthropic" and status in (502, 503, 504))
        ):
            problems.append(f"a {status} that is the proxy's own fault (code {ours!r})")
    elif status >= 400 and not (forwarded or directed):
        problems += error_problems(found, dialect) or [f"a {status} that is not the proxy's own error answer"]
    elif status >= 400 and dialect is Dialect.ANTHROPIC and isinstance(found, dict):
        if isinstance(found.get("error"), dict):  # the model server's error on an Anthropic route: in its shape
            problems += error_problems(found, dialect)
    elif 200 <= status < 300 and not directed:
        if route is not None and "event-stream" in answer.headers.get("Content-Type", ""):
            problems += stream_problems(route.path, answer)
        elif forwarded:
            problems += forwarded_problems(path or "", found)
        elif not local_get(case, path, answer):
            problems.append(f"a {status} that neither the fake server nor one of the proxy's GET routes gave")
    elif status == 200 and route is not None and "event-stream" in answer.headers.get("Content-Type", ""):
        problems += stream_problems(route.path, answer)  # the proxy watches a stream's end on a 200 only
    elif not (200 <= status < 600):
        problems.append(f"an unexpected status {status}")
    return problems


# Findings recognised, counted and reported (fuzz.json) rather than failed on, each with the input, what happens
# and where to fix it, so that the fuzzer looks past one while it waits for its fix. None is open now: the six
# found so far (a deep or non-UTF-8 body, a key header that is not UTF-8, a first chat event that cannot be
# written back, an Expect other than 100-continue, a head aiohttp cannot parse, a head over the cap in one
# read, an Expect on a path no route takes) are fixed, and their corpus inputs fail the run if they come back.
KNOWN: dict[str, str] = {}


def _head_lines(case: Case) -> list[bytes]:
    return case.wire.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]


def local_get(case: Case, path: str | None, answer: Answer) -> bool:
    """One of the proxy's own GET routes answered (GET / also for a target as odd as "GET  /")."""
    if case.method not in ("GET", "HEAD"):
        return False
    return path in LOCAL_GETS or (path or "").startswith("/v1/models/") or answer.body == OLLAMA_ROOT_TEXT.encode()


def known_cause(case: Case, answer: Answer | None, problem: str) -> str | None:
    """Which of ``KNOWN`` explains ``problem`` (one of what ``judge`` found wrong); None when none does."""
    return None


OUR_CODES = frozenset(error_codes()) | set(HTTP_ERROR_CODES.values()) | {"http_error"}


def _our_error(found: object, status: int) -> str | None:
    """The code of the proxy's own error answer (either dialect); None for any other answer."""
    if not isinstance(found, dict) or not isinstance(found.get("error"), dict):
        return None
    inner = found["error"]
    if found.get("type") == "error":  # Anthropic's shape: its message says whether the proxy wrote it
        message = str(inner.get("message", ""))
        if MARK in message:
            return None
        if "internal error (error id" in message:
            return "internal_error"
        return "anthropic"
    code = inner.get("code")
    return code if isinstance(code, str) and code in OUR_CODES and MARK not in str(inner.get("message")) else None


def forwarded_problems(path: str, found: dict) -> list[str]:
    """What reached the fake server must respect the proxy's rewrites."""
    problems = []
    if not found.get("object"):
        return ["the fake server got a body that is not a JSON object"]
    lengths = found.get("lengths", {})
    if path in GENERATING:
        if not lengths:
            problems.append("a generating request reached the model without a length cap")
        for name, value in lengths.items():
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= CONTEXT:
                problems.append(f"the model got {name} {value!r}, outside the cap")
    model_f = found.get("container") == "f"
    for key in found.get("keys", []):
        if key in DROPPED or (model_f and key in STRIPPED):
            problems.append(f"the model got the field '{key}', which the proxy drops")
    if model_f and found.get("forced") != FORCED:
        problems.append(f"model f got {found.get('forced')}, not its forced {FORCED}")
    return problems


def stream_problems(path: str, answer: Answer) -> list[str]:
    """A stream ends as the upstream said, or with an error event; its first chat event names the role."""
    ending = StreamEnd()
    ending.feed(answer.body)
    if not ending.complete:
        return ["a stream that ends neither complete nor with an error event"]
    ended_in_error = b"(error id " in answer.body.rstrip().rsplit(b"\n\n", 1)[-1]
    if path == "/v1/chat/completions" and not ended_in_error:
        # The first event (after the loading notes' SSE comments) is the one the proxy rewrites.
        first = next((e for e in answer.body.split(b"\n\n") if not e.startswith(b":")), b"")
        if first.startswith(b"data: {") and b'"choices"' in first and b'"delta"' in first:
            with contextlib.suppress(ValueError, RecursionError, KeyError, IndexError, TypeError, AttributeError):
                delta = json.loads(first[6:])["choices"][0]["delta"]
                if isinstance(delta, dict) and "role" not in delta:
                    return ["the first chat chunk has no delta.role"]
    return []
