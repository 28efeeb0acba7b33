"""The OpenAI-compatible proxy: routes each request by its ``model`` to that model's server.

Bodies are forwarded byte for byte unless ``daemon.request_fields`` changes a
field (intake.py decides; only then is the body written anew); streamed answers
are passed through chunk by chunk as they arrive, never buffered. A stream that
breaks off, or that ends without saying how it ended, gets an error event at its
end rather than passing for a complete answer. A model in the catalog that is
not running is started first. Control operations are never reachable from here.
Clients see only the errors that are theirs to see (web_errors.py); what reaches
the connections before a request does is edge.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time

import aiohttp
from aiohttp import web
from loguru import logger

from supervisor.api.intake import Intake, allowed_hosts_middleware, encode_object, parse_object, planned_fields
from supervisor.api.metrics import Metrics
from supervisor.api.web_errors import MODEL_KEY, proxy_error_middleware, public_error
from supervisor.config.settings import DaemonSettings
from supervisor.core.errors import BadRequest, InvalidApiKey, LocalllmError, UpstreamBusy, UpstreamFailed
from supervisor.core.scheduler import RETRY_AFTER
from supervisor.fleet.owner import Fleet, Instance, Reservation

FORWARDED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
FORWARDED_HEADERS = ("Content-Type", "Accept")
KEEPALIVE_SECONDS = 5.0
FIRST_EVENT_LIMIT = 1024 * 1024  # a first event larger than this is passed on as it is
# The status a stream that ended in an error event is counted under in the metrics (its headers said 200).
ERROR_STATUS = web.ResponseKey("localllm_error_status", int)


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
    app.router.add_get("/v1/models", proxy.list_models)
    app.router.add_get("/v1/models/{model:.+}", proxy.get_model)
    for path in FORWARDED_PATHS:
        app.router.add_post(path, proxy.forward)
    app.router.add_get("/health", proxy.health)
    app.router.add_get("/api/tags", proxy.ollama_tags)
    if metrics is not None:
        app.router.add_get("/metrics", metrics.handler)  # read-only; behind the API keys when they are set
    return app


def require_api_key(keys: list[str]):
    """Every /v1 request must carry ``Authorization: Bearer <one of the keys>`` (what LibreChat sends)."""
    expected = [key.encode() for key in keys]

    @web.middleware
    async def check(request: web.Request, handler) -> web.StreamResponse:
        if request.path.startswith(("/v1/", "/api/")) or request.path == "/metrics":
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.encode(), k) for k in expected):
                raise InvalidApiKey(
                    "missing or wrong API key: send 'Authorization: Bearer <key>' with one of "
                    "the keys in daemon.api_keys"
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
        self.intake = Intake(settings.proxy_limits)
        self.fields = settings.request_fields
        self.created = int(time.time())

    def _model_object(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "localllm"}

    async def list_models(self, request: web.Request) -> web.Response:
        data = [self._model_object(name) for name in self.fleet.instances]
        return web.json_response({"object": "list", "data": data})

    async def get_model(self, request: web.Request) -> web.Response:
        instance = self.fleet.resolve(request.match_info["model"])
        return web.json_response(self._model_object(instance.name))

    async def ollama_tags(self, request: web.Request) -> web.Response:
        """Ollama's model list, for clients that speak its API (LibreChat endpoints named "ollama..."): the catalog."""
        modified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created))
        models = [
            {
                "name": name,
                "model": name,
                "modified_at": modified,
                "size": instance.sizing.need,
                "digest": hashlib.sha256(name.encode()).hexdigest(),
                "details": {
                    "format": "gguf",
                    "family": "",
                    "families": None,
                    "parameter_size": "",
                    "quantization_level": "",
                    "backend": instance.entry.backend,
                },
            }
            for name, instance in self.fleet.instances.items()
        ]
        return web.json_response({"models": models})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """Route by ``model``; counted in the metrics by catalog name, endpoint and status (499: client left)."""
        started, status = time.monotonic(), 500
        try:
            async with self.intake.body_of(request) as body:
                response = await self._route(request, body)
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

    async def _route(self, request: web.Request, body: bytes) -> web.StreamResponse:
        payload = await parse_object(body)
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("field 'model' is required and must be a string naming a catalog model")
        instance = self.fleet.resolve(model)  # an unknown model: 404; a bad field: 400, before any model starts
        request[MODEL_KEY] = instance.name
        changed = planned_fields(payload, request.path, self.fields, instance.sizing.launch.context)
        if instance.entry.tag:  # its server knows it by its tag (Ollama)
            changed = {**(changed or payload), "model": instance.upstream_model}
        if changed is not None:
            body = await encode_object(changed, len(body))
        reservation = self.fleet.reserve(model)
        request[MODEL_KEY] = reservation.instance.name
        try:
            if payload.get("stream") is True and not reservation.granted.done():
                return await self._stream_after_load(request, reservation, body)
            await reservation.granted
            return await self._relay(request, reservation.instance, body, payload.get("stream") is True)
        finally:
            self.fleet.release(reservation)

    async def _relay(self, request: web.Request, instance: Instance, body: bytes, stream: bool) -> web.StreamResponse:
        try:
            with self.fleet.upstream(instance) as base_url:
                async with self._post_upstream(request, base_url, body, stream) as upstream:
                    content_type = upstream.headers.get("Content-Type", "application/json")
                    if upstream.status == self.fleet.hosting_of(instance.entry).busy_status:
                        raise await _busy(instance, upstream)
                    if upstream.content_length is not None and "event-stream" not in content_type:
                        data = await upstream.read()
                        return web.Response(status=upstream.status, body=data, headers={"Content-Type": content_type})
                    response = web.StreamResponse(status=upstream.status, headers=_sse_headers(content_type))
                    await response.prepare(request)
                    watched = upstream.status == 200 and "event-stream" in content_type
                    return await self._copy_stream(upstream, response, instance, watch_end=watched)
        except ConnectionResetError:  # the client left: nobody to answer (and not the model's fault)
            raise
        except aiohttp.ClientError as exc:
            self.fleet.note_upstream_failure(instance)
            raise _upstream_failed(instance, "did not answer", exc) from None

    async def _stream_after_load(
        self, request: web.Request, reservation: Reservation, body: bytes
    ) -> web.StreamResponse:
        """Headers now, SSE comments while the model loads, then the model's stream.

        Clients (LibreChat's among them) give up when headers take minutes; comments keep them waiting.
        """
        instance = reservation.instance
        response = web.StreamResponse(status=200, headers=_sse_headers("text/event-stream"))
        await response.prepare(request)
        try:
            await response.write(f": localllm: loading model {instance.name}\n\n".encode())
            while not (await asyncio.wait({reservation.granted}, timeout=KEEPALIVE_SECONDS))[0]:
                await response.write(f": localllm: still loading {instance.name}\n\n".encode())
            reservation.granted.result()
            with self.fleet.upstream(instance) as base_url:
                async with self._post_upstream(request, base_url, body, stream=True) as upstream:
                    if upstream.status == self.fleet.hosting_of(instance.entry).busy_status:
                        raise await _busy(instance, upstream)
                    if upstream.status != 200:  # its own answer to the request, as _relay passes it on
                        detail = (await upstream.read()).decode(errors="replace")[:2000]
                        text = f"model '{instance.name}' answered HTTP {upstream.status}: {detail}"
                        raise UpstreamFailed(text, public=text)
                    watched = "event-stream" in upstream.headers.get("Content-Type", "")
                    return await self._copy_stream(upstream, response, instance, watch_end=watched)
        except ConnectionResetError:
            logger.bind(model=instance.name).info("client went away while its model loaded")
            return response
        except aiohttp.ClientError as exc:
            self.fleet.note_upstream_failure(instance)
            await _write_error_event(response, _upstream_failed(instance, "did not answer", exc), instance.name)
        except LocalllmError as exc:
            await _write_error_event(response, exc, instance.name)
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
        self, upstream: aiohttp.ClientResponse, response: web.StreamResponse, instance: Instance, watch_end: bool
    ) -> web.StreamResponse:
        """Pass the stream through chunk by chunk; close the upstream request if the client leaves.

        Only the first event may be rewritten: llama-server sometimes leaves ``delta.role`` out of it
        (when the first token is ready at once), and LangChain-based clients such as LibreChat need it.
        With ``watch_end`` (an SSE stream), a stream whose body ends cleanly but without ``[DONE]`` or a
        finish reason (Ollama's when its runner fails mid-generation) gets an error event at its end.
        """
        first: bytes | None = b""  # the first event, gathered until complete; None once it went out
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
            await _write_error_event(
                response,
                _upstream_failed(instance, "broke off the stream", exc),
                instance.name,
                after_partial_event=ending.mid_event,
            )
            return response
        if watch_end and not ending.complete:
            logger.bind(model=instance.name).warning("upstream ended its stream without [DONE] or a finish reason")
            self.fleet.note_upstream_failure(instance)
            text = f"model '{instance.name}': the upstream stream ended without [DONE] or a finish reason (truncated)"
            await _write_error_event(
                response, UpstreamFailed(text, public=text), instance.name, after_partial_event=ending.mid_event
            )
            return response
        await response.write_eof()
        return response


class StreamEnd:
    """Whether the SSE bytes fed so far make a complete stream, found without parsing any JSON.

    Complete means that it said how it ended, and that it stops between events (SSE drops an event
    cut off before its blank line). An ending is ``data: [DONE]`` (OpenAI's shape, llama-server's
    and Ollama's), a non-null ``finish_reason`` (chat and ``/completions`` chunks) or ``stop_reason``
    (Anthropic's ``message_delta``), Anthropic's ``event: message_stop``, or an error event the
    upstream sent itself. The quoted markers cannot occur inside a JSON string, where quotes are
    escaped, and the others must start a line, which JSON text cannot (its newlines are escaped).
    The last bytes of each read are kept, so a marker split across two reads is still found.
    ``mid_event``: the bytes so far stop inside an event, and anything written next would be glued to it.
    """

    MARKERS = (
        b"\ndata: [DONE]",
        b"\ndata:[DONE]",
        b'"finish_reason":"',
        b'"finish_reason": "',
        b'"stop_reason":"',
        b'"stop_reason": "',
        b"\nevent: message_stop",
        b'\ndata: {"error"',
        b'\ndata:{"error"',
    )
    KEEP = max(len(marker) for marker in MARKERS) - 1

    def __init__(self) -> None:
        self._said_end = False
        self._tail = b"\n\n"  # the stream starts between events, at the start of a line

    def feed(self, chunk: bytes) -> None:
        window = self._tail + chunk
        self._said_end = self._said_end or any(marker in window for marker in self.MARKERS)
        self._tail = window[-self.KEEP :]

    @property
    def complete(self) -> bool:
        return self._said_end and not self.mid_event

    @property
    def mid_event(self) -> bool:
        return not self._tail.endswith((b"\n\n", b"\r\n\r\n"))


def with_assistant_role(event: bytes) -> bytes:
    """A chat completion chunk event whose first choice's delta has ``role: assistant``; others unchanged."""
    if not event.startswith(b"data: {"):
        return event
    try:
        chunk = json.loads(event[6:])
        delta = chunk["choices"][0]["delta"]
    except (ValueError, KeyError, IndexError, TypeError):
        return event
    if not isinstance(delta, dict) or "role" in delta:
        return event
    chunk["choices"][0]["delta"] = {"role": "assistant", **delta}
    return b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _sse_headers(content_type: str) -> dict[str, str]:
    return {"Content-Type": content_type, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _write_error_event(
    response: web.StreamResponse, error: LocalllmError, model: str, after_partial_event: bool = False
) -> None:
    """An error after the stream started: OpenAI's ``data: {"error": ...}`` event, then the end.

    After a partial event, blank lines end that one first, so the error is an event of its own. The
    metrics count the request under the error's status, not the 200 its headers carried. The client
    sees what it may see of the error (web_errors.public_error).
    """
    response[ERROR_STATUS] = error.http_status
    separator = b"\n\n" if after_partial_event else b""
    with contextlib.suppress(ConnectionResetError):
        await response.write(separator + b"data: " + json.dumps(public_error(error, model)).encode() + b"\n\n")
        await response.write_eof()


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
