"""What the proxy accepts of a request before routing it: its Host, its media type, its body and its fields.

- ``allowed_hosts_middleware``: with ``daemon.allowed_hosts``, any other Host header gets 421, so a page on
  another name that DNS-rebinds to our address reads nothing.
- ``Intake.body_of``: a JSON route's body must say ``application/json`` (415: a web page can send text/plain
  to a loopback address across origins without asking first) and its size (411); a body above
  ``max_body`` gets 413 and one that would take the bodies being received past ``body_budget`` gets 503
  with ``Retry-After``, both before a byte of it is read. Its share of the budget is held until the request
  ends. The body must arrive within ``body_timeout`` (408). Once read, a large body's share grows to what it
  will take parsed (``parsed_size``: up to 20 times its size for one of nothing but ``[],``), or it gets 413
  when that is more than the whole budget.
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
PARSED_CONTAINER = 64  # bytes a parsed JSON array or object takes at least (CPython 3.11: a list 56 + 8, a dict 64)
TOO_DEEP = "request body is nested too deeply: JSON arrays and objects deeper than about 900 levels are not accepted"


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
            parsed = parsed_size(body)
            if parsed > self.limits.body_budget:
                raise RequestTooLarge(
                    f"the request body ({size} bytes) holds so many JSON arrays and objects that, read, it would "
                    f"take about {parsed} bytes: more than this proxy holds for all bodies together "
                    f"({self.limits.body_budget} bytes)"
                )
            with self.budget.hold(max(0, parsed - size)):  # the rest of what it takes once parsed
                yield body


def parsed_size(body: bytes) -> int:
    """About what ``body`` takes once parsed, at the least its own size.

    Text and numbers take about their size, or a few times it; an array or object becomes a list or dict of 64
    bytes and more, so a body of nothing but ``[],`` (3 bytes each) takes 20 times its size. The brackets are
    counted in the bytes (inside strings too: it errs on the large side), only for bodies parsed off the loop.
    """
    if len(body) <= INLINE_JSON:
        return len(body)
    return max(len(body), PARSED_CONTAINER * (body.count(b"[") + body.count(b"{")))


async def parse_object(body: bytes) -> dict:
    """The body's JSON object (parsed on a worker thread when large); BadRequest otherwise.

    The body must be UTF-8 (a BOM is let pass, as ``json.loads`` lets it), and JSON as RFC 8259 writes it:
    ``NaN`` and ``Infinity`` are refused, as the model servers refuse them. Nesting deeper than Python's
    recursion limit allows (about 900 levels: ``{"x":[[[[...]]]]}``) is a BadRequest too, not a crash.
    """
    try:
        payload = await _off_loop(_loads, body) if len(body) > INLINE_JSON else _loads(body)
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(TOO_DEEP) from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    return payload


async def encode_object(payload: dict, size_hint: int) -> bytes:
    """``payload`` as compact UTF-8 JSON (written on a worker thread when large); BadRequest for NaN or infinity.

    A lone surrogate (a string that said ``"\\ud800"``, valid JSON) is written back as that escape.
    """
    try:
        return await _off_loop(_dumps, payload) if size_hint > INLINE_JSON else _dumps(payload)
    except RecursionError:
        raise BadRequest(TOO_DEEP) from None
    except ValueError as exc:
        raise BadRequest(f"request body has a number JSON cannot carry: {exc}") from None


def _loads(body: bytes) -> object:
    return json.loads(body.decode("utf-8").removeprefix("\ufeff"), parse_constant=_not_json)


def _not_json(constant: str) -> object:
    raise ValueError(f"{constant} is not a JSON number")


def _dumps(payload: dict) -> bytes:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate, from an escape: written as one again, as the client did
        return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


async def _off_loop(function, argument):
    """``function(argument)`` on a worker thread. A request cancelled meanwhile (its client left) still waits for
    the thread, so that its body's share of the body budget stays held while the thread parses or writes it."""
    work = asyncio.ensure_future(asyncio.to_thread(function, argument))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await work
        raise


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
                raise BadRequest(f"field '{name}' must be an integer (got {_shown(value)})")
            given = True
            if value < 0 or value > cap:
                changed[name] = cap
        if not given:
            changed["max_tokens"] = cap
    return None if changed == payload else changed


def _shown(value: object) -> str:
    """A JSON value in a few words: it may be huge, or nested too deeply to write."""
    if isinstance(value, (list, dict)):
        return "an array" if isinstance(value, list) else "an object"
    text = json.dumps(value[:40] if isinstance(value, str) else value)
    return text if len(text) <= 40 else text[:40] + "..."
