"""The OpenAI-compatible proxy: routes each request by its ``model`` to that model's server.

Bodies are forwarded byte for byte; streamed answers are passed through chunk
by chunk as they arrive, never buffered. A model in the catalog that is not
running is started first. Control operations are never reachable from here.
"""

from __future__ import annotations

import json
import time

import aiohttp
from aiohttp import web
from loguru import logger

from .errors import BadRequest, UpstreamFailed
from .fleet import Fleet, Instance
from .web_errors import error_middleware, read_json_object

FORWARDED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
FORWARDED_HEADERS = ("Content-Type", "Accept")
MAX_BODY = 64 * 1024 * 1024  # images travel base64-encoded inside chat requests


def create_proxy_app(fleet: Fleet, session: aiohttp.ClientSession) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY)
    proxy = Proxy(fleet, session)
    app.router.add_get("/v1/models", proxy.list_models)
    app.router.add_get("/v1/models/{model:.+}", proxy.get_model)
    for path in FORWARDED_PATHS:
        app.router.add_post(path, proxy.forward)
    app.router.add_get("/health", proxy.health)
    return app


class Proxy:
    def __init__(self, fleet: Fleet, session: aiohttp.ClientSession):
        self.fleet = fleet
        self.session = session
        self.created = int(time.time())

    def _model_object(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "localllm"}

    async def list_models(self, request: web.Request) -> web.Response:
        data = [self._model_object(name) for name in self.fleet.instances]
        return web.json_response({"object": "list", "data": data})

    async def get_model(self, request: web.Request) -> web.Response:
        instance = self.fleet.resolve(request.match_info["model"])
        return web.json_response(self._model_object(instance.name))

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def forward(self, request: web.Request) -> web.StreamResponse:
        body, payload = await read_json_object(request)
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("field 'model' is required and must be a string naming a catalog model")
        instance = await self.fleet.ensure_ready(model)
        with self.fleet.serving(instance):
            return await self._relay(request, instance, body)

    async def _relay(self, request: web.Request, instance: Instance, body: bytes) -> web.StreamResponse:
        headers = {h: request.headers[h] for h in FORWARDED_HEADERS if h in request.headers}
        url = instance.base_url + request.path
        try:
            async with self.session.post(url, data=body, headers=headers) as upstream:
                content_type = upstream.headers.get("Content-Type", "application/json")
                if upstream.content_length is not None and "event-stream" not in content_type:
                    data = await upstream.read()
                    return web.Response(status=upstream.status, body=data, headers={"Content-Type": content_type})
                return await self._stream(request, instance, upstream, content_type)
        except aiohttp.ClientError as exc:
            await self.fleet.note_upstream_failure(instance)
            raise UpstreamFailed(f"model '{instance.name}' did not answer: {exc}") from None

    async def _stream(self, request: web.Request, instance: Instance, upstream: aiohttp.ClientResponse,
                      content_type: str) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, headers={
            "Content-Type": content_type, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except ConnectionResetError:
            logger.bind(model=instance.name).info("client went away mid-stream; closing the upstream request")
            upstream.close()
            return response
        except aiohttp.ClientError as exc:
            logger.bind(model=instance.name).warning("upstream broke off mid-stream: {}", exc)
            await self.fleet.note_upstream_failure(instance)
            error = UpstreamFailed(f"model '{instance.name}' broke off the stream: {exc}")
            await response.write(b"data: " + _json_bytes(error.to_json()) + b"\n\n")
        await response.write_eof()
        return response


def _json_bytes(value: dict) -> bytes:
    return json.dumps(value).encode()
