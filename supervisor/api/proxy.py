"""The proxy: routes each request by its ``model`` to that model's server, on every route in routes.py.

Bodies are forwarded byte for byte unless ``daemon.request_fields`` or the model's ``filters``
change a field (intake.py and config/serving.py decide; only then is the body written anew);
streamed answers are passed through chunk by chunk as they arrive, never buffered. A stream that
breaks off, or that ends without saying how it ended, gets an error event at its end rather than
passing for a complete answer (streams.py). A model in the catalog that is not running is started
first; a streaming client sees its progress meanwhile (loading.py). Control operations are never
reachable from here. Clients see only the errors that are theirs to see (web_errors.py), in their
route's dialect (dialects.py); what reaches the connections before a request does is edge.py's.

Every wait on a model's server has a deadline (``daemon.timeouts``): connecting, ``upstream_connect``;
its answer's start (the head, and the first chunk of the body), ``first_byte`` from the request's
sending; each next chunk, ``stream_idle``. Past one, the request ends with ``upstream_timeout`` (504,
or an error event when the stream has begun), its upstream connection is closed (which ends the
generation), and the fleet checks the server as for any upstream failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from loguru import logger

from supervisor.api.dialects import error_body, upstream_error
from supervisor.api.intake import Intake, allowed_hosts_middleware, encode_object, parse_object, planned_fields
from supervisor.api.loading import KEEPALIVE_SECONDS, LoadingNotes
from supervisor.api.metrics import Metrics
from supervisor.api.model_list import ModelList
from supervisor.api.routes import MODEL_ROUTES, ROUTES_BY_PATH, Dialect, Route, check_served, dialect_of
from supervisor.api.streams import (
    ERROR_STATUS,
    StreamEnd,
    sse_headers,
    with_assistant_role,
    with_message_start,
    write_error_event,
)
from supervisor.api.web_errors import MODEL_KEY, proxy_error_middleware
from supervisor.config.settings import DaemonSettings
from supervisor.core.errors import (
    HTTP_ERROR_CODES,
    BadRequest,
    ConcurrencyLimit,
    InvalidApiKey,
    LocalllmError,
    UpstreamBusy,
    UpstreamFailed,
    UpstreamTimeout,
)
from supervisor.core.scheduler import RETRY_AFTER
from supervisor.fleet.owner import Fleet, Instance, Reservation

FORWARDED_HEADERS = ("Content-Type", "Accept", "anthropic-version", "anthropic-beta")
OPEN_PATHS = ("/", "/health")  # answered without an API key: they say nothing of the models
FIRST_EVENT_LIMIT = 1024 * 1024  # a first event larger than this is passed on as it is


def create_proxy_app(
    fleet: Fleet, session: aiohttp.ClientSession, settings: DaemonSettings, metrics: Metrics | None = None
) -> web.Application:
    middlewares = [proxy_error_middleware]
    if settings.allowed_hosts:
        middlewares.append(allowed_hosts_middleware(settings.allowed_hosts))
    if settings.api_keys:
        middlewares.append(require_api_key(settings.api_keys))
    # intake.py refuses larger bodies before reading them; aiohttp's own limit stays as a backstop
    app = web.Application(middlewares=middlewares, client_max_size=settings.proxy_limits.max_body + 1)
    proxy = Proxy(fleet, session, settings, metrics)
    models = ModelList(fleet, settings.list_aliases)
    app.router.add_get("/v1/models", models.list_models)
    app.router.add_get("/v1/models/{model:.+}", models.get_model)
    for route in MODEL_ROUTES:
        app.router.add_post(route.path, proxy.forward, expect_handler=expect_continue)
    app.router.add_get("/health", proxy.health)
    app.router.add_get("/", models.ollama_root)
    app.router.add_get("/api/version", models.ollama_version)
    app.router.add_get("/api/tags", models.ollama_tags)
    if metrics is not None:
        app.router.add_get("/metrics", metrics.handler)  # read-only; behind the API keys when they are set
    # Last: every other path and method, so that even a request no route takes meets the proxy's own Expect handling
    # and gets its 404 or 405 as an error object (aiohttp's own answers those before any middleware could).
    allowed: dict[str, set[str]] = {}
    for resource in app.router.resources():
        for route in resource:
            allowed.setdefault(resource.canonical, set()).add(route.method)
    app.router.add_route("*", "/{path:.*}", no_route(allowed), expect_handler=expect_continue)
    return app


def no_route(allowed: dict[str, set[str]]):
    async def refuse(request: web.Request) -> web.StreamResponse:
        methods = allowed.get(request.path)
        if methods:
            raise web.HTTPMethodNotAllowed(request.method, sorted(methods))
        raise web.HTTPNotFound()

    return refuse


async def expect_continue(request: web.Request) -> web.Response | None:
    """``Expect: 100-continue`` goes on as aiohttp's own handler does; any other Expect gets an error object (417),
    not aiohttp's text (which runs before any middleware, and fails on a value that is not UTF-8)."""
    if request.headers.get("Expect", "").lower() == "100-continue":
        if request.version == aiohttp.HttpVersion11:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the answer proper has not started
        return None
    body = {
        "error": {
            "message": "the only Expect this server meets is 100-continue",
            "type": "invalid_request_error",
            "param": None,
            "code": HTTP_ERROR_CODES[417],
        }
    }
    return web.json_response(error_body(dialect_of(request.path), body, 417), status=417)


def require_api_key(keys: list[str]):
    """Every request but ``OPEN_PATHS`` carries one of the keys: ``Authorization: Bearer <key>`` (what OpenAI
    clients and LibreChat send) or ``x-api-key: <key>`` (what Anthropic clients send)."""
    expected = [key.encode() for key in keys]

    def known(token: str) -> bool:  # a header that is not UTF-8 arrives with surrogates: compared as its bytes
        return any(hmac.compare_digest(token.encode("utf-8", "surrogateescape"), key) for key in expected)

    @web.middleware
    async def check(request: web.Request, handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if not (scheme.lower() == "bearer" and known(token)) and not known(request.headers.get("x-api-key", "")):
                raise InvalidApiKey(
                    "missing or wrong API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>') with "
                    "one of the keys in daemon.api_keys"
                )
        return await handler(request)

    return check


class Proxy:
    def __init__(
        self, fleet: Fleet, session: aiohttp.ClientSession, settings: DaemonSettings, metrics: Metrics | None = None
    ):
        self.fleet = fleet
        self.session = session
        self.metrics = metrics
        self.settings = settings
        self.intake = Intake(settings.proxy_limits)
        self.active: Counter[str] = Counter()  # requests per model, waiting or served (max_concurrent)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """Route by ``model``; counted in the metrics by catalog name, endpoint and status (499: client left)."""
        started, status = time.monotonic(), 500
        try:
            async with self.intake.body_of(request) as body:
                response = await self._route(request, ROUTES_BY_PATH[request.path], body)
            status = response.get(ERROR_STATUS, response.status)
            return response
        except LocalllmError as exc:
            status = exc.http_status
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            status = 499
            raise
        finally:
            if self.metrics is not None:
                self.metrics.observe_request(
                    request.get(MODEL_KEY, ""), request.path.removeprefix("/v1/"), status, time.monotonic() - started
                )

    def _model_of(self, payload: dict) -> str:
        """The request's ``model``, or the catalog's ``default_model`` for a request that names none."""
        model = payload.get("model")
        if model is None or model == "":
            model = self.fleet.config.default_model
            if model is None:
                raise BadRequest(
                    "field 'model' is required and must be a string naming a catalog model (or set default_model "
                    "in the config, for requests that name none)"
                )
        if not isinstance(model, str):
            raise BadRequest("field 'model' must be a string naming a catalog model")
        return model

    async def _route(self, request: web.Request, route: Route, body: bytes) -> web.StreamResponse:
        payload = await parse_object(body)
        instance = self.fleet.resolve(self._model_of(payload))  # unknown: 404; bad fields: 400, before a start
        request[MODEL_KEY] = instance.name
        check_served(route, instance.name, instance.entry.backend)
        changed = planned_fields(payload, request.path, self.settings.request_fields, instance.sizing.launch.context)
        changed = instance.entry.filters.apply(changed or payload) or changed
        if instance.entry.tag:  # its server knows it by its tag (Ollama)
            changed = {**(changed or payload), "model": instance.upstream_model}
        if changed is not None:
            body = await encode_object(changed, len(body))
        limit = instance.entry.max_concurrent
        if limit is not None and self.active[instance.name] >= limit:
            raise ConcurrencyLimit(
                f"model '{instance.name}' already has {limit} request(s) in flight (max_concurrent {limit}); "
                "try again shortly",
                retry_after=RETRY_AFTER,
            )
        self.active[instance.name] += 1
        reservation = self.fleet.reserve(instance.name)
        try:
            stream = payload.get("stream") is True
            progress = instance.entry.loading_progress or self.settings.loading_progress
            if stream and progress != "off" and not reservation.granted.done():
                reasoning = progress == "reasoning" and route.chat_chunks
                return await self._stream_after_load(request, route, reservation, body, reasoning)
            await reservation.granted
            return await self._relay(request, route, reservation.instance, body, stream)
        finally:
            self.fleet.release(reservation)
            self.active[instance.name] -= 1

    async def _relay(
        self, request: web.Request, route: Route, instance: Instance, body: bytes, stream: bool
    ) -> web.StreamResponse:
        try:
            with self.fleet.upstream(instance) as base_url:
                async with self._post_upstream(request, instance, base_url, body, stream) as (upstream, started):
                    content_type = upstream.headers.get("Content-Type", "application/json")
                    if upstream.status == self.fleet.hosting_of(instance.entry).busy_status:
                        raise _busy(instance, upstream, await self._body(upstream, instance, started))
                    if upstream.content_length is not None and "event-stream" not in content_type:
                        data = await self._body(upstream, instance, started)
                        if upstream.status >= 400:
                            data = upstream_error(route.dialect, data, upstream.status)
                        return web.Response(status=upstream.status, body=data, headers={"Content-Type": content_type})
                    response = web.StreamResponse(status=upstream.status, headers=sse_headers(content_type))
                    await response.prepare(request)
                    watched = upstream.status == 200 and "event-stream" in content_type
                    return await self._copy_stream(upstream, started, response, route, instance, watch_end=watched)
        except ConnectionResetError:  # the client left: nobody to answer (and not the model's fault)
            raise
        except UpstreamTimeout:
            self.fleet.note_upstream_failure(instance)
            raise
        except aiohttp.ClientError as exc:
            self.fleet.note_upstream_failure(instance)
            raise _upstream_failed(instance, "did not answer", exc) from None

    async def _stream_after_load(
        self, request: web.Request, route: Route, reservation: Reservation, body: bytes, reasoning: bool
    ) -> web.StreamResponse:
        """Headers now, progress notes while the model loads (loading.py), then the model's stream."""
        instance = reservation.instance
        response = web.StreamResponse(status=200, headers=sse_headers("text/event-stream"))
        await response.prepare(request)
        notes = LoadingNotes(self.fleet, instance, response, reasoning)
        try:
            await notes.begin()
            while not (await asyncio.wait({reservation.granted}, timeout=KEEPALIVE_SECONDS))[0]:
                await notes.still()
            reservation.granted.result()
            await notes.ready()
            with self.fleet.upstream(instance) as base_url:
                async with self._post_upstream(request, instance, base_url, body, True) as (upstream, started):
                    if upstream.status == self.fleet.hosting_of(instance.entry).busy_status:
                        raise _busy(instance, upstream, await self._body(upstream, instance, started))
                    if upstream.status != 200:  # its own answer to the request, as _relay passes it on
                        detail = (await self._body(upstream, instance, started)).decode(errors="replace")[:2000]
                        text = f"model '{instance.name}' answered HTTP {upstream.status}: {detail}"
                        raise UpstreamFailed(text, public=text)
                    watched = "event-stream" in upstream.headers.get("Content-Type", "")
                    return await self._copy_stream(upstream, started, response, route, instance, watch_end=watched)
        except ConnectionResetError:
            logger.bind(model=instance.name).info("client went away while its model loaded")
            return response
        except UpstreamTimeout as exc:
            self.fleet.note_upstream_failure(instance)
            await write_error_event(response, exc, instance.name, route.dialect)
        except aiohttp.ClientError as exc:
            self.fleet.note_upstream_failure(instance)
            error = _upstream_failed(instance, "did not answer", exc)
            await write_error_event(response, error, instance.name, route.dialect)
        except LocalllmError as exc:
            await write_error_event(response, exc, instance.name, route.dialect)
        return response

    @contextlib.asynccontextmanager
    async def _post_upstream(
        self, request: web.Request, instance: Instance, base_url: str, body: bytes, stream: bool
    ) -> AsyncIterator[tuple[aiohttp.ClientResponse, float]]:
        """The upstream's answer once its head is in, and when the request was sent (the loop's clock): connecting
        within ``upstream_connect``, the head within ``first_byte``; else UpstreamTimeout."""
        timeouts = self.settings.timeouts
        headers = {h: request.headers[h] for h in FORWARDED_HEADERS if h in request.headers}
        if stream:
            # llama-server closes the connection after a streamed answer without saying so: back in the
            # pool, it would fail the next request sent on it (502 "Server disconnected"). Said here, the
            # connection is not pooled.
            headers["Connection"] = "close"
        limits = aiohttp.ClientTimeout(total=None, sock_connect=timeouts.upstream_connect, sock_read=None)
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout_at(started + timeouts.first_byte):
                upstream = await self.session.post(base_url + request.path, data=body, headers=headers, timeout=limits)
        except aiohttp.ConnectionTimeoutError:
            raise _timed_out(
                instance, f"took no connection within {timeouts.upstream_connect:g}s", "upstream_connect"
            ) from None
        except TimeoutError:
            raise _timed_out(instance, f"did not answer within {timeouts.first_byte:g}s", "first_byte") from None
        async with upstream:
            yield upstream, started

    async def _chunks(
        self, upstream: aiohttp.ClientResponse, instance: Instance, started: float
    ) -> AsyncIterator[bytes]:
        """The answer's body as it arrives: its first chunk by ``first_byte`` after ``started``, each next one within
        ``stream_idle``; else UpstreamTimeout."""
        timeouts = self.settings.timeouts
        first = True
        while True:
            try:
                if first:
                    async with asyncio.timeout_at(started + timeouts.first_byte):
                        chunk = await upstream.content.readany()
                else:
                    async with asyncio.timeout(timeouts.stream_idle):
                        chunk = await upstream.content.readany()
            except TimeoutError:
                if first:
                    raise _timed_out(
                        instance, f"did not answer within {timeouts.first_byte:g}s", "first_byte"
                    ) from None
                raise _timed_out(
                    instance, f"sent nothing for {timeouts.stream_idle:g}s mid-answer", "stream_idle"
                ) from None
            if not chunk:
                return
            first = False
            yield chunk

    async def _body(self, upstream: aiohttp.ClientResponse, instance: Instance, started: float) -> bytes:
        """The whole body of an answer, read within the deadlines of ``_chunks``."""
        return b"".join([chunk async for chunk in self._chunks(upstream, instance, started)])

    async def _copy_stream(
        self,
        upstream: aiohttp.ClientResponse,
        started: float,
        response: web.StreamResponse,
        route: Route,
        instance: Instance,
        watch_end: bool,
    ) -> web.StreamResponse:
        """Pass the stream through chunk by chunk; close the upstream request if the client leaves.

        Only the first event of a chat stream may be rewritten: llama-server sometimes leaves
        ``delta.role`` out of it (when the first token is ready at once), and LangChain-based clients
        such as LibreChat need it. With ``watch_end`` (an SSE stream), a stream whose body ends cleanly
        but without saying how it ended (Ollama's when its runner fails mid-generation) gets an error
        event at its end. A stream that stalls (``_chunks``' deadlines) gets one too.
        """
        # The first event, gathered until complete, of a stream whose first event llama-server may get wrong
        first: bytes | None = b"" if route.chat_chunks or route.dialect is Dialect.ANTHROPIC else None
        ending = StreamEnd()
        try:
            async for chunk in self._chunks(upstream, instance, started):
                ending.feed(chunk)
                if first is not None:
                    first += chunk
                    end = first.find(b"\n\n")
                    if end < 0 and len(first) < FIRST_EVENT_LIMIT:
                        continue
                    split = end + 2 if end >= 0 else len(first)
                    fix = first_event_fix(route, instance.name)
                    chunk, first = fix(first[:split]) + first[split:], None
                await response.write(chunk)
            if first:
                await response.write(first)
        except ConnectionResetError:
            logger.bind(model=instance.name).info("client went away mid-stream; closing the upstream request")
            upstream.close()
            return response
        except UpstreamTimeout as error:
            logger.bind(model=instance.name).warning("{}; closing the upstream request", error.message)
            upstream.close()
            self.fleet.note_upstream_failure(instance)
            await write_error_event(response, error, instance.name, route.dialect, ending.mid_event)
            return response
        except aiohttp.ClientError as exc:
            logger.bind(model=instance.name).warning("upstream broke off mid-stream: {}", exc)
            self.fleet.note_upstream_failure(instance)
            error = _upstream_failed(instance, "broke off the stream", exc)
            await write_error_event(response, error, instance.name, route.dialect, ending.mid_event)
            return response
        if watch_end and not ending.complete:
            logger.bind(model=instance.name).warning("upstream ended its stream without [DONE] or a finish reason")
            self.fleet.note_upstream_failure(instance)
            text = f"model '{instance.name}': the upstream stream ended without [DONE] or a finish reason (truncated)"
            error = UpstreamFailed(text, public=text)
            await write_error_event(response, error, instance.name, route.dialect, ending.mid_event)
            return response
        await response.write_eof()
        return response


def first_event_fix(route: Route, model: str):
    """What the first event of ``route``'s stream needs: ``role`` in a chat chunk, ``message_start`` before
    Anthropic's events (llama-server leaves each out when its first token comes with others)."""
    if route.dialect is Dialect.ANTHROPIC:
        return lambda event: with_message_start(event, model)
    return with_assistant_role


def _upstream_failed(instance: Instance, what: str, exc: Exception) -> UpstreamFailed:
    """The transport's words (addresses, socket paths) go to the log; the client learns what happened."""
    public = f"model '{instance.name}' {what}"
    return UpstreamFailed(f"{public}: {exc}", public=public)


def _timed_out(instance: Instance, what: str, setting: str) -> UpstreamTimeout:
    text = f"model '{instance.name}' {what} (daemon.timeouts.{setting})"
    return UpstreamTimeout(text, public=text)


def _busy(instance: Instance, upstream: aiohttp.ClientResponse, body: bytes) -> UpstreamBusy:
    """Ollama's 503 past its queue (``OLLAMA_MAX_QUEUE``): an overload the client should retry, said as ours."""
    detail = body.decode(errors="replace")[:500]
    retry = upstream.headers.get("Retry-After", "")
    return UpstreamBusy(
        f"the Ollama server serving '{instance.name}' is busy (its queue is full; OLLAMA_MAX_QUEUE): {detail}",
        retry_after=int(retry) if retry.isascii() and retry.isdigit() else RETRY_AFTER,
    )
