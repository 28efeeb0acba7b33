"""The control API, on a unix socket: the daemon's status and each model's state.

Only local users with access to the socket (mode 0660) reach it; the proxy
never exposes these routes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from . import __version__
from .errors import BadRequest
from .fleet import Fleet
from .rollout import Rollout
from .web_errors import error_middleware, read_json_object


@dataclass(frozen=True)
class DaemonFacts:
    """What the status reports about the daemon itself; fixed at start-up."""

    instance: str
    profile: str
    profile_reason: str
    docker_version: str
    proxy_urls: tuple[str, ...]
    started_at: float


def create_control_app(fleet: Fleet, facts: DaemonFacts, rollout: Rollout) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=16 * 1024 * 1024)

    async def status(request: web.Request) -> web.Response:
        daemon = {**daemon_status(facts), "degraded": fleet.degraded,
                  "generation": rollout.store.active, "last_good": rollout.store.last_good}
        return web.json_response({"daemon": daemon, "models": fleet.snapshot()})

    async def apply(request: web.Request) -> web.Response:
        _, body = await read_json_object(request)
        text, source = body.get("config"), body.get("source")
        if not isinstance(text, str) or not isinstance(source, str):
            raise BadRequest("apply needs 'config' (the file's text) and 'source' (its path)")
        return web.json_response(await rollout.apply(text, source, Path(source)))

    async def history(request: web.Request) -> web.Response:
        return web.json_response({"generations": rollout.store.as_list()})

    async def rollback(request: web.Request) -> web.Response:
        _, body = await read_json_object(request)
        number = body.get("generation")
        if number is not None and not isinstance(number, int):
            raise BadRequest("'generation' must be a generation number or null")
        return web.json_response(await rollout.rollback(number))

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"models": fleet.snapshot()})

    async def model(request: web.Request) -> web.Response:
        return web.json_response(fleet.describe(fleet.resolve(request.match_info["name"])))

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "pid": os.getpid()})

    app.router.add_get("/status", status)
    app.router.add_get("/models", models)
    app.router.add_get("/models/{name:.+}", model)
    app.router.add_get("/health", health)
    app.router.add_post("/apply", apply)
    app.router.add_get("/history", history)
    app.router.add_post("/rollback", rollback)
    return app


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
