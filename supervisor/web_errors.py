"""The one place where errors become HTTP answers, for the proxy and the control API."""

from __future__ import annotations

import json

from aiohttp import web
from loguru import logger

from .errors import HTTP_ERROR_CODES, BadRequest, LocalllmError


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except LocalllmError as exc:
        retry_after = getattr(exc, "retry_after", None)
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        return web.json_response(exc.to_json(), status=exc.http_status, headers=headers)
    except ConnectionError:  # the client went away: aiohttp drops the connection quietly
        raise
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        body = {"error": {"message": f"{exc.reason}: {request.method} {request.path}",
                          "type": "invalid_request_error", "param": None,
                          "code": HTTP_ERROR_CODES.get(exc.status, "http_error")}}
        return web.json_response(body, status=exc.status)
    except Exception:
        logger.opt(exception=True).error("unhandled error in {} {}", request.method, request.path)
        return web.json_response(LocalllmError("internal error; see the localllmd log").to_json(), status=500)


async def read_json_object(request: web.Request) -> tuple[bytes, dict]:
    """The raw body and its parsed JSON object; BadRequest otherwise."""
    body = await request.read()
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    return body, payload
