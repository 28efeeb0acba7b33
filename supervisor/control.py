"""The control API: the daemon's status, its models, operator actions, config changes, events and logs.

It listens on a unix socket (mode 0660, group ``daemon.socket_group``) and,
optionally, on TCP (``daemon.control_listen``), where every request needs
``Authorization: Bearer <daemon.control_token>``. The proxy never exposes
these routes. The API describes itself at ``GET /openapi.json``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from . import __version__
from .control_openapi import openapi_document
from .errors import BadRequest, Conflict, InvalidToken, LocalllmError
from .events import EventBus
from .fleet import Fleet
from .rollout import Rollout
from .scheduler import Phase
from .web_errors import error_middleware, read_json_object

SSE_KEEPALIVE = 15.0  # seconds between comment lines on an idle event stream
MAX_LIMIT = 1000


@dataclass(frozen=True)
class DaemonFacts:
    """What the status reports about the daemon itself; fixed at start-up."""

    instance: str
    profile: str
    profile_reason: str
    docker_version: str
    proxy_urls: tuple[str, ...]
    started_at: float


def create_control_app(fleet: Fleet, facts: DaemonFacts, rollout: Rollout, events: EventBus,
                       token: str | None = None, metrics=None) -> web.Application:
    middlewares = [error_middleware] + ([require_token(token)] if token else [])
    app = web.Application(middlewares=middlewares, client_max_size=16 * 1024 * 1024)
    api = ControlApi(fleet, facts, rollout, events)
    routes = [
        ("GET", "/openapi.json", api.openapi),
        ("GET", "/health", api.health),
        ("GET", "/status", api.status),
        ("GET", "/models", api.models),
        ("GET", "/models/{name}", api.model),
        ("POST", "/models/{name}/load", api.load),
        ("POST", "/models/{name}/unload", api.unload),
        ("GET", "/models/{name}/logs", api.logs),
        ("GET", "/models/{name}/memory", api.memory),
        ("GET", "/events", api.events),
        ("POST", "/validate", api.validate),
        ("POST", "/apply", api.apply),
        ("GET", "/history", api.history),
        ("POST", "/rollback", api.rollback),
    ]
    if metrics is not None:
        routes.append(("GET", "/metrics", metrics.handler))
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    return app


def require_token(token: str):
    """TCP control: every request must carry ``Authorization: Bearer <token>``."""
    expected = token.encode()

    @web.middleware
    async def check(request: web.Request, handler) -> web.StreamResponse:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise InvalidToken("missing or wrong token: the TCP control API needs 'Authorization: Bearer "
                               "<daemon.control_token>'")
        return await handler(request)

    return check


class ControlApi:
    def __init__(self, fleet: Fleet, facts: DaemonFacts, rollout: Rollout, events: EventBus):
        self.fleet = fleet
        self.facts = facts
        self.rollout = rollout
        self.bus = events

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    async def health(self, request: web.Request) -> web.Response:
        """200 when all is well; 503 with the problems otherwise (``localllmctl status --check``)."""
        fleet, problems = self.fleet, []
        if fleet.engine_problem:
            problems.append(f"Docker engine: {fleet.engine_problem}")
        if fleet.degraded:
            problems.append(f"degraded: {fleet.degraded}")
        problems += [f"device {d['id']} unusable: {d['problem']}" for d in fleet.devices() if d["problem"]]
        for name, slot in fleet.scheduler.slots.items():
            if slot.phase is Phase.FAILED:
                problems.append(f"model {name} failed: {fleet.instances[name].error or slot.error}")
        body = {"status": "unhealthy" if problems else "ok", "problems": problems, "pid": os.getpid(),
                "version": __version__, "uptime_seconds": round(time.time() - self.facts.started_at, 3)}
        return web.json_response(body, status=503 if problems else 200)

    async def status(self, request: web.Request) -> web.Response:
        daemon = {**daemon_status(self.facts), "degraded": self.fleet.degraded,
                  "generation": self.rollout.store.active, "last_good": self.rollout.store.last_good,
                  "last_event_id": self.bus.last_id}
        return web.json_response({"daemon": daemon, "devices": self.fleet.devices(), "models": self.fleet.snapshot()})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"models": self.fleet.snapshot()})

    async def model(self, request: web.Request) -> web.Response:
        return web.json_response(self.fleet.describe(self.fleet.resolve(request.match_info["name"])))

    async def load(self, request: web.Request) -> web.Response:
        self._refuse_during_config_change()
        instance = await finish_even_if_client_leaves(self.fleet.load(request.match_info["name"]))
        return web.json_response(self.fleet.describe(instance))

    async def unload(self, request: web.Request) -> web.Response:
        self._refuse_during_config_change()
        instance = await finish_even_if_client_leaves(self.fleet.unload(request.match_info["name"]))
        return web.json_response(self.fleet.describe(instance))

    def _refuse_during_config_change(self) -> None:
        if self.rollout.busy:
            raise Conflict("a config change is being applied; try again when it is done")

    async def memory(self, request: web.Request) -> web.Response:
        return web.json_response(await self.fleet.memory_estimate(request.match_info["name"]))

    async def logs(self, request: web.Request) -> web.StreamResponse:
        tail = int_param(request, "tail", 100, 0, 100_000)
        follow = bool_param(request, "follow")
        chunks = self.fleet.logs(request.match_info["name"], tail, follow)  # unknown, not running: a JSON error
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            async for chunk in chunks:
                await response.write(chunk)
        except LocalllmError as exc:  # the answer has begun: say it in the text
            await response.write(f"localllmd: {exc.message}\n".encode())
        finally:
            await chunks.aclose()
        await response.write_eof()
        return response

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the recent ones (up to ``limit``, newer than ``after``), then, with
        ``follow``, each new one as it happens. ``Last-Event-ID`` resumes where a client left off."""
        limit = int_param(request, "limit", 50, 0, MAX_LIMIT)
        after = int_param(request, "after", 0, 0, 2**62, request.headers.get("Last-Event-ID"))
        follow = bool_param(request, "follow")
        model = request.query.get("model")
        if model is not None:
            model = self.fleet.resolve(model).name
        subscription = self.bus.subscribe() if follow else None  # before the backlog: nothing falls between
        backlog = self.bus.recent(after, model)
        backlog = backlog[len(backlog) - limit:] if limit else []
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        try:
            await response.prepare(request)
            last = backlog[-1].id if backlog else after
            for event in backlog:
                await write_event(response, event)
            if subscription is not None:
                await self._follow(response, subscription, model, last)
        finally:
            if subscription is not None:
                subscription.close()
        await response.write_eof()
        return response

    async def _follow(self, response: web.StreamResponse, subscription, model: str | None, last: int) -> None:
        stream = aiter(subscription)
        while True:
            try:
                event = await asyncio.wait_for(anext(stream), SSE_KEEPALIVE)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            except StopAsyncIteration:
                if subscription.overflowed:
                    await response.write(b"event: overflow\ndata: {\"message\": \"too slow; events were dropped, "
                                         b"reconnect with Last-Event-ID\"}\n\n")
                return
            if event.id > last and (model is None or event.model == model):
                await write_event(response, event)

    async def validate(self, request: web.Request) -> web.Response:
        text, source = await config_body(request)
        return web.json_response(await self.rollout.preview(text, source, Path(source)))

    async def apply(self, request: web.Request) -> web.Response:
        text, source = await config_body(request)
        return web.json_response(await finish_even_if_client_leaves(self.rollout.apply(text, source, Path(source))))

    async def history(self, request: web.Request) -> web.Response:
        return web.json_response({"generations": self.rollout.store.as_list()})

    async def rollback(self, request: web.Request) -> web.Response:
        _, body = await read_json_object(request)
        number = body.get("generation")
        if number is not None and (not isinstance(number, int) or isinstance(number, bool)):
            raise BadRequest("'generation' must be a generation number or null")
        return web.json_response(await finish_even_if_client_leaves(self.rollout.rollback(number)))


async def finish_even_if_client_leaves(coroutine):
    """Run an admin operation to its end even if the client disconnects (a config change half-done is worse)."""
    task = asyncio.ensure_future(coroutine)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: a client that left never reads it
    return await asyncio.shield(task)


async def config_body(request: web.Request) -> tuple[str, str]:
    """``config`` (a config file's text) and ``source`` (its absolute path, for relative model paths)."""
    _, body = await read_json_object(request)
    text, source = body.get("config"), body.get("source")
    if not isinstance(text, str) or not isinstance(source, str):
        raise BadRequest("the body needs 'config' (the file's text) and 'source' (its absolute path)")
    if not source.startswith("/") or "\0" in source or len(source) > 4096:
        raise BadRequest(f"'source' must be the config file's absolute path, not {source[:100]!r}")
    return text, source


async def write_event(response: web.StreamResponse, event) -> None:
    payload = json.dumps(event.as_json(), separators=(",", ":"))
    await response.write(f"id: {event.id}\nevent: {event.kind}\ndata: {payload}\n\n".encode())


def int_param(request: web.Request, name: str, default: int, low: int, high: int, fallback: str | None = None) -> int:
    raw = request.query.get(name, fallback)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"query parameter '{name}' must be an integer, not {raw[:40]!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"query parameter '{name}' must be between {low} and {high}, not {value}")
    return value


def bool_param(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise BadRequest(f"query parameter '{name}' must be true or false, not {raw[:40]!r}")
    return raw in ("true", "1")


def daemon_status(facts: DaemonFacts) -> dict:
    return {
        "version": __version__,
        "pid": os.getpid(),
        "instance": facts.instance,
        "profile": facts.profile,
        "profile_reason": facts.profile_reason,
        "docker_version": facts.docker_version,
        "proxy": list(facts.proxy_urls),
        "started_at": facts.started_at,
        "uptime_seconds": round(time.time() - facts.started_at, 3),
    }
