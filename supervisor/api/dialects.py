"""Errors in the shape each client family reads: OpenAI's, or Anthropic's on the Messages routes.

The proxy builds every error as OpenAI's ``{"error": {"message", "type", "param", "code"}}``
(web_errors.public_error); an Anthropic route turns it into
``{"type": "error", "error": {"type": ..., "message": ...}}`` with the type the anthropic SDKs
know for its status, so that they raise the right exception and show the message.
"""

from __future__ import annotations

import json

from supervisor.api.routes import Dialect

# Anthropic's error types by HTTP status (docs: "Errors"); anything else 5xx is an api_error.
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_body(dialect: Dialect, openai_error: dict, status: int) -> dict:
    """``openai_error`` (``{"error": {...}}``) as the route's dialect says it."""
    if dialect is not Dialect.ANTHROPIC:
        return openai_error
    inner = openai_error.get("error", {})
    kind = ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": inner.get("message", "")}}


def error_event(dialect: Dialect, openai_error: dict, status: int) -> bytes:
    """The SSE event that ends a stream with an error: Anthropic's ``event: error``, or OpenAI's data-only one."""
    body = json.dumps(error_body(dialect, openai_error, status)).encode()
    if dialect is Dialect.ANTHROPIC:
        return b"event: error\ndata: " + body + b"\n\n"
    return b"data: " + body + b"\n\n"


def upstream_error(dialect: Dialect, data: bytes, status: int) -> bytes:
    """A model server's own error answer, in the route's dialect: llama-server answers OpenAI-shaped errors
    on its Anthropic routes too, which Anthropic clients cannot read. Anything else passes unchanged."""
    if dialect is not Dialect.ANTHROPIC:
        return data
    try:
        body = json.loads(data)
    except ValueError:
        return data
    if not isinstance(body, dict) or body.get("type") == "error" or not isinstance(body.get("error"), dict):
        return data
    return json.dumps(error_body(dialect, body, status)).encode()
