"""What the proxy accepts of a request before routing it: its Host, its media type, its body and its fields.

- ``allowed_hosts_middleware``: with ``daemon.allowed_hosts``, any other Host header gets 421, so a page on
  another name that DNS-rebinds to our address reads nothing.
- ``Intake.body_of``: a JSON route's body must say ``application/json`` (415: a web page can send text/plain
  to a loopback address across origins without asking first) and its size (411); a body above
  ``max_body`` gets 413 and one that would take the bodies being received past ``body_budget`` gets 503
  with ``Retry-After``, both before a byte of it is read. Its share of the budget is held until the request
  ends. The body must arrive within ``body_timeout`` (408).
- ``parse_object`` and ``encode_object``: JSON, off the event loop once a body is large.
- ``planned_fields``: the request's fields as ``daemon.request_fields`` wants them (pure).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from aiohttp import web
from loguru import logger

from supervisor.config.settings import ProxyLimits, RequestFields
from supervisor.core.errors import (
    BadRequest,
    BodyBudgetExceeded,
    HostNotAllowed,
    LengthRequired,
    RequestTimeout,
    RequestTooLarge,
    UnsupportedMediaType,
)

INLINE_JSON = 256 * 1024  # bodies larger than this are parsed and written on a worker thread
BUDGET_RETRY_AFTER = 2  # seconds a client refused for the body budget is told to wait
LENGTH_FIELDS = ("n_predict", "max_tokens", "max_completion_tokens")
GENERATING_PATHS = ("/v1/chat/completions", "/v1/completions")  # where a length cap means something


def allowed_hosts_middleware(hosts: list[str]):
    """Only requests whose Host header names one of ``hosts`` (any port); 421 for the others."""
    allowed = {host.lower().strip("[]") for host in hosts}

    @web.middleware
    async def check(request: web.Request, handler) -> web.StreamResponse:
        host = host_name(request.headers.get("Host", ""))
        if host not in allowed:
            raise HostNotAllowed(f"this proxy does not answer for the host '{host}' (daemon.allowed_hosts)")
        return await handler(request)

    return check


def host_name(header: str) -> str:
    """The name or address in a Host header, lower-cased, without its port or IPv6 brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def check_json_media_type(request: web.Request) -> None:
    """``application/json``, optionally with ``charset=utf-8``, and no content coding; 415 otherwise."""
    written = request.headers.get("Content-Type", "")
    media_type, *params = [part.strip().lower() for part in written.split(";")]
    charsets = [p.partition("=")[2].strip('"') for p in params if p.partition("=")[0].strip() == "charset"]
    others = [p for p in params if p.partition("=")[0].strip() != "charset"]
    if media_type != "application/json" or others or any(c not in ("utf-8", "utf8") for c in charsets):
        shown = f"'{written}'" if written else "none"
        raise UnsupportedMediaType(f"{request.path} takes JSON: send 'Content-Type: application/json' (got {shown})")
    coding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if coding != "identity":
        raise UnsupportedMediaType(f"Content-Encoding '{coding}' is not accepted: send the JSON body as it is")


class BodyBudget:
    """The bytes of request bodies being received or held, all requests together."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    @contextlib.contextmanager
    def hold(self, size: int):
        if self.used + size > self.limit:
            logger.warning(
                "request body of {} bytes refused: bodies in flight hold {} of the {} bytes of "
                "daemon.proxy_limits.body_budget",
                size,
                self.used,
                self.limit,
            )
            raise BodyBudgetExceeded(
                f"the proxy is receiving too many large request bodies at once; try again in {BUDGET_RETRY_AFTER}s",
                retry_after=BUDGET_RETRY_AFTER,
            )
        self.used += size
        try:
            yield
        finally:
            self.used -= size


class Intake:
    def __init__(self, limits: ProxyLimits):
        self.limits = limits
        self.budget = BodyBudget(limits.body_budget)

    @contextlib.asynccontextmanager
    async def body_of(self, request: web.Request) -> AsyncIterator[bytes]:
        """A JSON route's body, read within its deadline, with its share of the body budget held meanwhile."""
        check_json_media_type(request)
        size = request.content_length
        if size is None:
            if request.body_exists:  # chunked: no size to count before reading
                raise LengthRequired(f"{request.path} needs a Content-Length: chunked request bodies are not accepted")
            raise BadRequest("the request has no body: send a JSON object")
        if size > self.limits.max_body:
            raise RequestTooLarge(
                f"the request body ({size} bytes) is larger than this proxy accepts ({self.limits.max_body} bytes)"
            )
        with self.budget.hold(size):
            try:
                async with asyncio.timeout(self.limits.body_timeout):
                    body = await request.read()
            except TimeoutError:
                raise RequestTimeout(f"the request body did not arrive within {self.limits.body_timeout:g}s") from None
            yield body


async def parse_object(body: bytes) -> dict:
    """The body's JSON object (parsed on a worker thread when large); BadRequest otherwise."""
    try:
        payload = await asyncio.to_thread(json.loads, body) if len(body) > INLINE_JSON else json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    return payload


async def encode_object(payload: dict, size_hint: int) -> bytes:
    """``payload`` as compact UTF-8 JSON (written on a worker thread when large); BadRequest for NaN or infinity."""

    def encode() -> bytes:
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()

    try:
        return await asyncio.to_thread(encode) if size_hint > INLINE_JSON else encode()
    except ValueError as exc:
        raise BadRequest(f"request body has a number JSON cannot carry: {exc}") from None


def planned_fields(payload: dict, path: str, fields: RequestFields, context: int) -> dict | None:
    """The payload with ``fields.drop`` removed and its generation length capped; None when nothing changes.

    The cap is ``fields.max_tokens``, or the model's ``context`` size. A length field above it, or negative
    (llama.cpp's -1: until the context is full, or forever with context shift), is cut to it; a generating
    request with none (or only nulls) gets ``max_tokens``. A length that is not an integer is a BadRequest,
    since llama-server would take a wrong type as "no limit".
    """
    changed = {key: value for key, value in payload.items() if key not in fields.drop}
    if path in GENERATING_PATHS:
        cap = fields.max_tokens or context
        given = False
        for name in LENGTH_FIELDS:
            value = changed.get(name)
            if value is None:
                changed.pop(name, None)
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadRequest(f"field '{name}' must be an integer (got {json.dumps(value)[:40]})")
            given = True
            if value < 0 or value > cap:
                changed[name] = cap
        if not given:
            changed["max_tokens"] = cap
    return None if changed == payload else changed
