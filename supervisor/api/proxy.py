"""The proxy: routes each request by its ``model`` to that model's server, on every route in routes.py.

Bodies are forwarded byte for byte unless ``daemon.request_fields`` or the model's ``filters``
change a field (intake.py and config/serving.py decide; only then is the body written anew);
streamed answers are passed through chunk by chunk as they arrive, never buffered. A stream that
breaks off, or that ends without saying how it ended, gets an error event at its end rather than
passing for a complete answer (streams.py). A model in the catalog that is not running is started
first; a streaming client sees its progress meanwhile (loading.py). Control operations are never
reachable from here. Clients see only the errors that are theirs to see (web_errors.py), in their
route's dialect (dialects.py); what reaches the connections before a request does is edge.py's.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import Counter

import aiohttp
from aiohttp import web
from loguru import logger

from supervisor.api.dialects import upstream_error
from supervisor.api.intake import Intake, allowed_hosts_middleware, encode_object, parse_object, planned_fields
from supervisor.api.loading import KEEPALIVE_SECONDS, LoadingNotes
from supervisor.api.metrics import Metrics
from supervisor.api.model_list import ModelList
from supervisor.api.routes import MODEL_ROUTES, ROUTES_BY_PATH, Route, check_served
from supervisor.api.streams import ERROR_STATUS, StreamEnd, sse_headers, with_assistant_role, write_error_event
from supervisor.api.web_errors import MODEL_KEY, proxy_error_middleware
from supervisor.config.settings import DaemonSettings
from supervisor.core.errors import (
    BadRequest,
    ConcurrencyLimit,
    InvalidApiKey,
    LocalllmError,
    UpstreamBusy,
    UpstreamFailed,
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
        app.router.add_post(route.path, proxy.forward)
    app.router.add_get("/health", proxy.health)
    app.router.add_get("/", models.ollama_root)
    app.router.add_get("/api/version", models.ollama_version)
    app.router.add_get("/api/tags", models.ollama_tags)
    if metrics is not None:
        app.router.add_get("/metrics", metrics.handler)  # read-only; behind the API keys when they are set
    return app


def require_api_key(keys: list[str]):
    """Every request but ``OPEN_PATHS`` carries one of the keys: ``Authorization: Bearer <key>`` (what OpenAI
    clients and LibreChat send) or ``x-api-key: <key>`` (what Anthropic clients send)."""
    expected = [key.encode() for key in keys]

    def known(token: str) -> bool:
        return any(hmac.compare_digest(token.encode(), key) for key in expected)

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
                async with self._post_upstream(request, base_url, body, stream) as upstream:
                    content_type = upstream.headers.get("Content-Type", "application/json")
                    if upstream.status == self.fleet.hosting_of(instance.entry).busy_status:
                        raise await _busy(instance, upstream)
                    if upstream.content_length is not None and "event-stream" not in content_type:
                        data = await upstream.read()
                        if upstream.status >= 400:
                            data = upstream_error(route.dialect, data, upstream.status)
                        return web.Response(status=upstream.status, body=data, headers={"Content-Type": content_type})
                    response = web.StreamResponse(status=upstream.status, headers=sse_headers(content_type))
                    await response.prepare(request)
                    watched = upstream.status == 200 and "event-stream" in content_type
                    return await self._copy_stream(upstream, response, route, instance, watch_end=watched)
        except ConnectionResetError:  # the client left: nobody to answer (and not the model's fault)
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
                async with self._post_upstream(request, base_url, body, stream=True) as upstream:
                    if upstream.status == self.fleet.hosting_of(instance.entry).busy_status:
                        raise await _busy(instance, upstream)
                    if upstream.status != 200:  # its own answer to the request, as _relay passes it on
                        detail = (await upstream.read()).decode(errors="replace")[:2000]
                        text = f"model '{instance.name}' answered HTTP {upstream.status}: {detail}"
                        raise UpstreamFailed(text, public=text)
                    watched = "event-stream" in upstream.headers.get("Content-Type", "")
                    return await self._copy_stream(upstream, response, route, instance, watch_end=watched)
        except ConnectionResetError:
            logger.bind(model=instance.name).info("client went away while its model loaded")
            return response
        except aiohttp.ClientError as exc:
            self.fleet.note_upstream_failure(instance)
            error = _upstream_failed(instance, "did not answer", exc)
            await write_error_event(response, error, instance.name, route.dialect)
        except LocalllmError as exc:
            await write_error_event(response, exc, instance.name, route.dialect)
        return response

    def _post_upstream(self, request: web.Request, base_url: str, body: bytes, stream: bool):
        headers = {h: request.headers[h] for h in FORWARDED_HEADERS if h in request.headers}
        if stream:
            # llama-server closes the connection after a streamed answer without saying so: back in the
            # pool, it would fail the next request sent on it (502 "Server disconnected"). Said here, the
            # connection is not pooled.
            headers["Connection"] = "close"
        return self.session.post(base_url + request.path, data=body, headers=headers)

    async def _copy_stream(
        self,
        upstream: aiohttp.ClientResponse,
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
        event at its end.
        """
        first: bytes | None = b"" if route.chat_chunks else None  # the first event, until complete
        ending = StreamEnd()
        try:
            async for chunk in upstream.content.iter_any():
                ending.feed(chunk)
                if first is not None:
                    first += chunk
                    end = first.find(b"\n\n")
                    if end < 0 and len(first) < FIRST_EVENT_LIMIT:
                        continue
                    split = end + 2 if end >= 0 else len(first)
                    chunk, first = with_assistant_role(first[:split]) + first[split:], None
                await response.write(chunk)
            if first:
                await response.write(first)
        except ConnectionResetError:
            logger.bind(model=instance.name).info("client went away mid-stream; closing the upstream request")
            upstream.close()
            return response
        except aiohttp.ClientError as exc:
            logger.bind(model=instance.name).warning("upstream broke off mid-stream: {}", exc)
            self.fleet.note_upstream_failure(instance)
            error = _upstream_failed(instance, "broke off the stream", exc)
            await write_error_event(response, error, instance.name, route.dialect, ending.mid_event)
            return response
        if watch_end and not ending.complete:
            logger.bind(model=instance.name).warning("upstream ended its stream without saying how it ended")
            self.fleet.note_upstream_failure(instance)
            text = f"model '{instance.name}': the upstream stream ended without [DONE] or a finish reason (truncated)"
            error = UpstreamFailed(text, public=text)
            await write_error_event(response, error, instance.name, route.dialect, ending.mid_event)
            return response
        await response.write_eof()
        return response


def _upstream_failed(instance: Instance, what: str, exc: Exception) -> UpstreamFailed:
    """The transport's words (addresses, socket paths) go to the log; the client learns what happened."""
    public = f"model '{instance.name}' {what}"
    return UpstreamFailed(f"{public}: {exc}", public=public)


async def _busy(instance: Instance, upstream: aiohttp.ClientResponse) -> UpstreamBusy:
    """Ollama's 503 past its queue (``OLLAMA_MAX_QUEUE``): an overload the client should retry, said as ours."""
    detail = (await upstream.read()).decode(errors="replace")[:500]
    retry = upstream.headers.get("Retry-After", "")
    return UpstreamBusy(
        f"the Ollama server serving '{instance.name}' is busy (its queue is full; OLLAMA_MAX_QUEUE): {detail}",
        retry_after=int(retry) if retry.isdigit() else RETRY_AFTER,
    )
