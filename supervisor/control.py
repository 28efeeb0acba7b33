"""The control API, on a unix socket: the daemon's status and each model's state.

Only local users with access to the socket (mode 0660) reach it; the proxy
never exposes these routes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from aiohttp import web

from . import __version__
from .fleet import Fleet
from .web_errors import error_middleware


@dataclass(frozen=True)
class DaemonFacts:
    """What the status reports about the daemon itself; fixed at start-up."""

    instance: str
    profile: str
    profile_reason: str
    docker_version: str
    proxy_urls: tuple[str, ...]
    started_at: float


def create_control_app(fleet: Fleet, facts: DaemonFacts) -> web.Application:
    app = web.Application(middlewares=[error_middleware])

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"daemon": daemon_status(facts), "models": fleet.snapshot()})

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
