"""The proxy's connections: read deadlines for request heads, a short keep-alive, and a cap on connections.

aiohttp's server waits for a request head as long as its keep-alive allows (an hour by default) and
accepts every connection, so a client that opens thousands of sockets and trickles a byte now and
then ("slowloris") holds them all. ``EdgeHandler`` is aiohttp's protocol with a deadline per phase
of a connection, on one timer:

- head: from the connection's opening, or from the first byte of a later request, until its line
  and headers are in (``header_timeout``), and at most ``MAX_HEAD`` bytes of them; then 408 (or 431)
  and the connection is closed;
- busy: the request is being handled (its body's deadline is the handler's: intake.py);
- idle: after a response, until the next request's first byte (``keep_alive``); then closed.

``Edge`` counts the connections of every proxy listener together. At ``max_connections``, a new
connection closes the one that has waited longest for a request (idle, or a head still arriving),
so slow clients cannot crowd out new ones; when every connection is busy, the new one gets 503.
``EdgeSite`` is aiohttp's TCP site with this protocol.

The handler knows that aiohttp waits for a head by ``RequestHandler._waiter`` (aiohttp 3.14), the
state aiohttp's own keep-alive timer reads; tests/unit/test_edge.py pins the behaviour.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import yarl
from aiohttp import hdrs, web
from aiohttp.web_protocol import RequestHandler
from loguru import logger

from supervisor.api.dialects import error_body
from supervisor.api.routes import dialect_of
from supervisor.config.settings import ProxyLimits
from supervisor.core.errors import HTTP_ERROR_CODES, HeadTooLarge, LocalllmError, RequestTimeout, TooManyConnections

MAX_HEAD = 64 * 1024  # bytes of request line and headers: aiohttp alone would buffer up to 128 x 8 KiB
LINGER = 2.0  # seconds an unread body is read and dropped after the answer, so the client can read it
BACKLOG = 1024  # connections the kernel queues before they are accepted
WARN_EVERY = 10.0  # seconds between warnings that the connection cap is being hit
REFUSAL_RETRY_AFTER = 1


class Phase(enum.Enum):
    HEAD = "head"
    BUSY = "busy"
    IDLE = "idle"


class Edge:
    """Every proxy connection, and which of them wait for a request, oldest first."""

    def __init__(self, limits: ProxyLimits):
        self.limits = limits
        self.open: set[EdgeHandler] = set()
        self.waiting: OrderedDict[EdgeHandler, None] = OrderedDict()
        self.dropped = 0  # connections closed or refused at the cap since the last warning
        self._warned_at = 0.0

    def handler_options(self) -> dict:
        """aiohttp's settings for the proxy's connections (for the runner, and for each EdgeHandler)."""
        return {
            "access_log": None,
            # aiohttp's own keep-alive timer only as a backstop: the phase deadlines always come first
            "keepalive_timeout": self.limits.keep_alive + self.limits.header_timeout,
            "lingering_time": LINGER,
            "auto_decompress": False,  # a compressed body would get past the body budget's count
        }

    def runner(self, app: web.Application, shutdown_timeout: float) -> web.AppRunner:
        return web.AppRunner(
            app, shutdown_timeout=shutdown_timeout, handler_cancellation=True, **self.handler_options()
        )

    def protocol(self, server: web.Server) -> EdgeHandler:
        return EdgeHandler(server, self, loop=asyncio.get_running_loop(), **self.handler_options())

    def admit(self, handler: EdgeHandler) -> bool:
        """Count a new connection; at the cap, close the longest-waiting one, or refuse this one."""
        self.open.add(handler)
        if len(self.open) <= self.limits.max_connections:
            return True
        victim = next((h for h in self.waiting if h is not handler), None)
        self._note_drop()
        if victim is not None:
            logger.debug("connection cap: closing a connection that waited longest for a request")
            victim.force_close()
            self.forget(victim)
            return True
        return False

    def forget(self, handler: EdgeHandler) -> None:
        self.open.discard(handler)
        self.waiting.pop(handler, None)

    def moved(self, handler: EdgeHandler, phase: Phase) -> None:
        self.waiting.pop(handler, None)
        if phase is not Phase.BUSY and handler in self.open:
            self.waiting[handler] = None

    def _note_drop(self) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            logger.warning(
                "the proxy is at daemon.proxy_limits.max_connections ({}): {} connection(s) closed or "
                "refused since the last warning",
                self.limits.max_connections,
                self.dropped,
            )
            self._warned_at, self.dropped = now, 0


class EdgeHandler(RequestHandler):
    """aiohttp's HTTP/1.1 protocol, with the deadlines of ``Edge``'s limits per phase of the connection."""

    __slots__ = ("_edge", "_phase", "_timer", "_head_bytes", "_head_start")

    def __init__(self, manager: web.Server, edge: Edge, **kwargs):
        super().__init__(manager, **kwargs)
        self._edge = edge
        self._phase = Phase.HEAD
        self._timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._head_start = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._edge.admit(self):
            self._refuse(
                TooManyConnections(
                    "the proxy has too many connections; try again shortly", retry_after=REFUSAL_RETRY_AFTER
                )
            )
            return
        self._enter(Phase.HEAD)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timer()
        self._edge.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase is Phase.IDLE and data:
            self._enter(Phase.HEAD)
        if self._phase is Phase.HEAD and self._awaiting_head():  # a head ending in this read counts up to its end
            if self._head_bytes == 0:
                self._head_start = data[:512]  # its request line: the route an error answer is shaped for
            end = data.find(b"\r\n\r\n")
            if self._head_bytes + (len(data) if end < 0 else end + 4) > MAX_HEAD:
                self._refuse(HeadTooLarge(f"the request line and headers are larger than {MAX_HEAD} bytes"))
                return
        super().data_received(data)
        if self._phase is not Phase.HEAD:
            return
        if not self._awaiting_head():
            self._enter(Phase.BUSY)
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD:
            self._refuse(HeadTooLarge(f"the request line and headers are larger than {MAX_HEAD} bytes"))

    async def finish_response(self, request, resp, start_time):
        """The answer is out: the connection waits for its next request from now."""
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            if self.transport is not None:
                self._enter(Phase.IDLE)

    def _awaiting_head(self) -> bool:
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _enter(self, phase: Phase) -> None:
        self._phase = phase
        self._head_bytes = 0
        self._cancel_timer()
        self._edge.moved(self, phase)
        limit = {Phase.HEAD: self._edge.limits.header_timeout, Phase.IDLE: self._edge.limits.keep_alive}.get(phase)
        if limit is not None:
            self._timer = self._loop.call_later(limit, self._expired, phase)

    def _expired(self, phase: Phase) -> None:
        self._timer = None
        if not self._awaiting_head():  # a request is being handled after all (pipelined): its answer re-arms
            self._phase = Phase.BUSY
            self._edge.moved(self, Phase.BUSY)
            return
        if phase is Phase.HEAD:
            self._refuse(
                RequestTimeout(
                    f"the request line and headers did not arrive within {self._edge.limits.header_timeout:g}s"
                )
            )
        else:
            self.force_close()

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None, message: str | None = None):
        """What aiohttp's parser refuses (a bad request line, a header over its limits, no Host...) is the client's
        error: answered as an error object like every other, and logged at debug level, not as a traceback."""
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        logger.debug("proxy refused a request aiohttp could not parse ({}): {}", status, exc or message)
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        reason = _REASONS.get(status) or HTTPStatus(status).phrase
        what = f"{reason}: {exc or message or 'the request could not be parsed'}"
        body = {
            "error": {
                "message": what,
                "type": "invalid_request_error",
                "param": None,
                "code": HTTP_ERROR_CODES.get(status, "http_error"),
            }
        }
        body = error_body(dialect_of(self._target_path()), body, status)
        response = web.json_response(body, status=status)
        response.force_close()
        return response

    def _target_path(self) -> str:
        """The path of the request line of the head being read (aiohttp's placeholder request has none)."""
        return routed_path(request_target(self._head_start.split(b"\r\n", 1)[0]))

    def _refuse(self, error: LocalllmError) -> None:
        """Answer ``error`` on the raw connection (no request is being handled) and close it."""
        logger.debug("proxy connection closed: {}", error.message)
        if self.transport is not None:
            body = json.dumps(error.to_json()).encode()
            retry = getattr(error, "retry_after", None)
            head = (
                f"HTTP/1.1 {error.http_status} {_REASONS.get(error.http_status, 'Error')}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
                + (f"Retry-After: {retry}\r\n" if retry else "")
                + "\r\n"
            )
            self.transport.write(head.encode() + body)
        self._cancel_timer()
        self._edge.forget(self)
        self.force_close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class EdgeSite(web.BaseSite):
    """aiohttp's TCP site, with ``EdgeHandler`` as the protocol of every connection."""

    __slots__ = ("_edge", "_host", "_port")

    def __init__(self, runner: web.BaseRunner, edge: Edge, host: str, port: int):
        super().__init__(runner, backlog=BACKLOG)
        self._edge, self._host, self._port = edge, host, port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        """The port it listens on (the one the kernel chose, for port 0)."""
        return self._server.sockets[0].getsockname()[1] if self._server else self._port

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        if not isinstance(server.request_handler, RefusingTunnels):  # one runner may serve several sites
            server.request_handler = RefusingTunnels(server.request_handler)
        self._server = await asyncio.get_running_loop().create_server(
            lambda: self._edge.protocol(server), self._host, self._port, backlog=self._backlog, reuse_address=True
        )


class RefusingTunnels:
    """The app's request handler, but CONNECT (a tunnel, which the proxy never opens) gets a 405 error object.

    aiohttp's router cannot route CONNECT's authority-form target at all, so it met aiohttp's own answers before
    any middleware: a text 417 for an ``Expect`` header, or a 500 for one that was not UTF-8 (atheris findings).
    """

    def __init__(self, handle: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]):
        self.handle = handle

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method != hdrs.METH_CONNECT:
            return await self.handle(request)
        body = {
            "error": {
                "message": "CONNECT asks for a tunnel, and this server opens none",
                "type": "invalid_request_error",
                "param": None,
                "code": HTTP_ERROR_CODES[405],
            }
        }
        response = web.json_response(body, status=405, headers={"Allow": "GET, HEAD, POST"})
        response.force_close()
        return response


def request_target(request_line: bytes) -> str:
    """The target of a request line, as the parser finds it: past the method and any run of spaces."""
    return next((part for part in request_line.split(b" ")[1:] if part), b"").decode("latin-1")


def routed_path(target: str) -> str:
    """The path aiohttp routes a request target by (``request.path``), read as its parser reads it: an
    origin-form target ("/v1/x?q") is a path as it stands, even "//x/y"; any other is read as a URL (yarl
    drops the control characters that lead it). For a head aiohttp refused, this says which route it meant.
    "" when no path can be read."""
    try:
        if target.startswith("/"):
            return yarl.URL.build(path=target.partition("#")[0].partition("?")[0], encoded=True).path
        return yarl.URL(target, encoded=True).path
    except ValueError:
        return ""
