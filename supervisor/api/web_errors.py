"""The one place where errors become HTTP answers, for the proxy and the control API.

The control API answers with every error's whole message: its callers are operators. The proxy's
clients get the message only of the classes that are ``client_safe`` (errors.py); of the others,
which can carry what a container printed, host paths, the Docker socket or internal addresses,
they get the class's summary and an error id, and the log gets the whole message under that id.
"""

from __future__ import annotations

import json
import secrets

from aiohttp import web
from loguru import logger

from supervisor.api.dialects import error_body
from supervisor.api.routes import dialect_of
from supervisor.core.errors import HTTP_ERROR_CODES, BadRequest, EdgeRefusal, LocalllmError, Overloaded

# The catalog name of the model a proxy request is for, once known: redacted messages name it.
MODEL_KEY = web.RequestKey("localllm_model", str)


def new_error_id() -> str:
    return secrets.token_hex(5)


def public_error(error: LocalllmError, model: str | None = None) -> dict:
    """The OpenAI-shaped error object a proxy client may see; a redacted one is logged in full first."""
    if error.client_safe:
        return error.to_json()
    error_id = new_error_id()
    logger.bind(error_id=error_id, code=error.code, **({"model": model} if model else {})).warning(
        "error {} (not shown to the proxy client): {}", error_id, error.message
    )
    summary = error.summary()
    if model and f"'{model}'" not in summary:
        summary = f"model '{model}': {summary}"
    message = (
        f"{summary} (error id {error_id}); an operator can see the details in the localllmd log under "
        f"that id, or with `localllmctl status`"
    )
    return {"error": {"message": message, "type": error.openai_type, "param": None, "code": error.code}}


def error_middleware_for(redact: bool):
    """Errors as JSON answers; ``redact``: the proxy's variant, which shows clients only what is theirs to see."""

    @web.middleware
    async def errors(request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except LocalllmError as exc:
            retry_after = exc.retry_after if isinstance(exc, Overloaded) else None
            headers = {"Retry-After": str(retry_after)} if retry_after else None
            body = public_error(exc, request.get(MODEL_KEY)) if redact else exc.to_json()
            if redact:  # a proxy client: in its route's dialect (Anthropic's shape on /v1/messages)
                body = error_body(dialect_of(request.path), body, exc.http_status)
            response = web.json_response(body, status=exc.http_status, headers=headers)
            if redact and isinstance(exc, (EdgeRefusal, Overloaded)) and not request.content.is_eof():
                response.force_close()  # a body we did not read: the connection cannot carry another request
            return response
        except ConnectionError:  # the client went away: aiohttp drops the connection quietly
            raise
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            body = {
                "error": {
                    "message": f"{exc.reason}: {request.method} {request.path}",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": HTTP_ERROR_CODES.get(exc.status, "http_error"),
                }
            }
            if redact:
                body = error_body(dialect_of(request.path), body, exc.status)
            return web.json_response(body, status=exc.status)
        except Exception:
            error_id = new_error_id()
            logger.bind(error_id=error_id).opt(exception=True).error(
                "unhandled error {} in {} {}", error_id, request.method, request.path
            )
            error = LocalllmError(f"internal error (error id {error_id}); see the localllmd log under that id")
            body = error_body(dialect_of(request.path), error.to_json(), 500) if redact else error.to_json()
            return web.json_response(body, status=500)

    return errors


error_middleware = error_middleware_for(redact=False)  # the control API: operators see every detail
proxy_error_middleware = error_middleware_for(redact=True)


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
