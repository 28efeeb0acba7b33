"""The control API: the daemon's status, its models, operator actions, config changes, events and logs.

Each route needs a role (``ROUTES``; see access.py): viewer, operator or admin. It is
served on one unix socket per role (the admin one: ``daemon.control_socket``, mode 0660,
group ``daemon.socket_group``) and, optionally, on TCP (``daemon.control_listen``), where
every request needs ``Authorization: Bearer <token>`` and the token gives the role. The
proxy never exposes these routes. The API describes itself at ``GET /openapi.json``; its answers go out through
their models (control_models.py), from which that document's schemas are generated.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import socket
import ssl
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from loguru import logger

from supervisor import __version__
from supervisor.api.control_models import Answer, ApplyReport, Health, History, Model, ModelList, Preview, Status
from supervisor.api.control_openapi import openapi_document
from supervisor.api.web_errors import error_middleware, read_json_object
from supervisor.config.access import (
    ROUTE_ROLES,
    ControlTls,
    Gate,
    Listener,
    Role,
    SocketListener,
    TcpListener,
    gate_for,
    unreachable_by_role,
    ways_to_roles,
    who_may_use,
)
from supervisor.core.errors import BadRequest, CannotListen, Conflict, LocalllmError
from supervisor.core.slots import Phase
from supervisor.fleet import views
from supervisor.fleet.events import EventBus
from supervisor.fleet.owner import Fleet
from supervisor.fleet.rollout import Rollout

SSE_KEEPALIVE = 15.0  # seconds between comment lines on an idle event stream
MAX_LIMIT = 1000
ROUTES = (  # method, path, ControlApi method; each one's role is in access.ROUTE_ROLES
    ("GET", "/openapi.json", "openapi"),
    ("GET", "/health", "health"),
    ("GET", "/status", "status"),
    ("GET", "/models", "models"),
    ("GET", "/models/{name}", "model"),
    ("POST", "/models/{name}/load", "load"),
    ("POST", "/models/{name}/unload", "unload"),
    ("GET", "/models/{name}/logs", "logs"),
    ("GET", "/models/{name}/memory", "memory"),
    ("GET", "/events", "events"),
    ("POST", "/validate", "validate"),
    ("POST", "/apply", "apply"),
    ("GET", "/history", "history"),
    ("POST", "/rollback", "rollback"),
)


@dataclass(frozen=True)
class DaemonFacts:
    """What the status reports about the daemon itself; fixed at start-up."""

    instance: str
    profile: str
    profile_reason: str
    docker_version: str
    proxy_urls: tuple[str, ...]
    started_at: float


def create_control_app(
    fleet: Fleet, facts: DaemonFacts, rollout: Rollout, events: EventBus, gate: Gate | None = None, metrics=None
) -> web.Application:
    """The control API for one listener; ``gate`` tells each caller's role (default: admin, for in-process use)."""
    gate = gate or Gate(Role.ADMIN)
    api = ControlApi(fleet, facts, rollout, events)
    routes = [(method, path, getattr(api, name)) for method, path, name in ROUTES]
    if metrics is not None:
        routes.append(("GET", "/metrics", metrics.handler))
    app = web.Application(
        middlewares=[error_middleware, gate.middleware(ROUTE_ROLES)], client_max_size=16 * 1024 * 1024
    )
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    return app


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
        for name, slot in fleet.scheduler.views().items():
            if slot.phase is Phase.FAILED:
                problems.append(f"model {name} failed: {fleet.instances[name].error or slot.error}")
        body = {
            "status": "unhealthy" if problems else "ok",
            "problems": problems,
            "pid": os.getpid(),
            "version": __version__,
            "uptime_seconds": round(time.time() - self.facts.started_at, 3),
        }
        return answer(Health, body, status=503 if problems else 200)

    async def status(self, request: web.Request) -> web.Response:
        daemon = {
            **daemon_status(self.facts),
            "degraded": self.fleet.degraded,
            "generation": self.rollout.store.active,
            "last_good": self.rollout.store.last_good,
            "last_event_id": self.bus.last_id,
        }
        return answer(Status, {"daemon": daemon, "devices": self.fleet.devices(), "models": self.fleet.snapshot()})

    async def models(self, request: web.Request) -> web.Response:
        return answer(ModelList, {"models": self.fleet.snapshot()})

    async def model(self, request: web.Request) -> web.Response:
        return answer(Model, self.fleet.describe(self.fleet.resolve(request.match_info["name"])))

    async def load(self, request: web.Request) -> web.Response:
        self._refuse_during_config_change()
        instance = await finish_even_if_client_leaves(self.fleet.load(request.match_info["name"]))
        return answer(Model, self.fleet.describe(instance))

    async def unload(self, request: web.Request) -> web.Response:
        self._refuse_during_config_change()
        instance = await finish_even_if_client_leaves(self.fleet.unload(request.match_info["name"]))
        return answer(Model, self.fleet.describe(instance))

    def _refuse_during_config_change(self) -> None:
        if self.rollout.busy:
            raise Conflict("a config change is being applied; try again when it is done")

    async def memory(self, request: web.Request) -> web.Response:
        return web.json_response(await views.memory_estimate(self.fleet, request.match_info["name"]))

    async def logs(self, request: web.Request) -> web.StreamResponse:
        tail = int_param(request, "tail", 100, 0, 100_000)
        follow = bool_param(request, "follow")
        chunks = views.logs(self.fleet, request.match_info["name"], tail, follow)  # unknown, not running: a JSON error
        response = web.StreamResponse(
            headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-cache"}
        )
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
        backlog = backlog[len(backlog) - limit :] if limit else []
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
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
                    await response.write(
                        b'event: overflow\ndata: {"message": "too slow; events were dropped, '
                        b'reconnect with Last-Event-ID"}\n\n'
                    )
                return
            if event.id > last and (model is None or event.model == model):
                await write_event(response, event)

    async def validate(self, request: web.Request) -> web.Response:
        text, source = await config_body(request)
        return answer(Preview, await self.rollout.preview(text, source, Path(source)))

    async def apply(self, request: web.Request) -> web.Response:
        text, source = await config_body(request)
        report = await finish_even_if_client_leaves(self.rollout.apply(text, source, Path(source)))
        return answer(ApplyReport, report)

    async def history(self, request: web.Request) -> web.Response:
        return answer(History, {"generations": self.rollout.store.as_list()})

    async def rollback(self, request: web.Request) -> web.Response:
        _, body = await read_json_object(request)
        number = body.get("generation")
        if number is not None and (not isinstance(number, int) or isinstance(number, bool)):
            raise BadRequest("'generation' must be a generation number or null")
        return answer(ApplyReport, await finish_even_if_client_leaves(self.rollout.rollback(number)))


def answer(model: type[Answer], data: object, status: int = 200) -> web.Response:
    """``data`` sent as its model serializes it, checked on the way: a key the model lacks, or one missing, is a
    ValidationError (a bug, answered with 500 and logged), never a document that says other than what is served."""
    body = model.model_validate(data).model_dump_json(exclude_unset=True)
    return web.Response(text=body, status=status, content_type="application/json")


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


# -- the listeners ------------------------------------------------------------------------


async def open_control(
    plan: list[Listener], app_for: Callable[[Gate], web.Application], grace: float
) -> list[web.AppRunner]:
    """Serve the control API on each listener of ``plan`` (access.plan_listeners), each with the app ``app_for``
    makes for its gate; raise CannotListen, with none left open."""
    ways = ways_to_roles(plan)
    runners: list[web.AppRunner] = []
    try:
        for listener in plan:
            runner = web.AppRunner(
                app_for(gate_for(listener, ways)), access_log=None, shutdown_timeout=grace, handler_cancellation=True
            )
            await runner.setup()
            runners.append(runner)
            if isinstance(listener, SocketListener):
                await _serve_socket(runner, listener)
            else:
                await _serve_tcp(runner, listener)
    except BaseException:
        for runner in runners:
            await runner.cleanup()
        raise
    return runners


def remove_sockets(plan: list[Listener]) -> None:
    """At shutdown: the socket files of ``plan``; anything else found at a socket's path is not ours to remove."""
    for listener in plan:
        if isinstance(listener, SocketListener):
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(listener.path.lstat().st_mode):
                    listener.path.unlink()


def group_id(group: str, setting: str) -> int:
    """A group name, or a number, as a gid."""
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise CannotListen(
            f"{setting}: there is no group '{group}' on this host (create it, or remove the setting)"
        ) from None


async def _serve_socket(runner: web.AppRunner, listener: SocketListener) -> None:
    """Bound, given its group and mode, and only then listening: no one connects before the mode is right."""
    path = listener.path
    gid = group_id(listener.group, listener.group_setting) if listener.group else -1
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or (path.exists() and not stat.S_ISSOCK(path.stat().st_mode)):
            raise CannotListen(
                f"cannot serve the {listener.role} control socket on {path}: something else is "
                "there (not a socket); move it, or choose another path"
            )
        path.unlink(missing_ok=True)  # a socket left by a daemon that died
        sock.bind(str(path))
        try:
            os.chown(path, -1, gid)
        except PermissionError:
            raise CannotListen(
                f"{listener.group_setting}: localllmd cannot give {path} to group {listener.group}: "
                "its user must be a member of that group (install.sh adds it to the role "
                "groups), or run as root"
            ) from None
        os.chmod(path, listener.mode)
        sock.listen(128)
        await web.SockSite(runner, sock).start()
    except OSError as exc:
        sock.close()
        raise CannotListen(
            f"cannot serve the {listener.role} control socket on {path}: {exc.strerror or exc}"
        ) from None
    except BaseException:
        sock.close()
        raise
    problem = unreachable_by_role(path, gid, listener.mode)
    if problem:
        logger.warning("{} control socket: {}", listener.role, problem)
    logger.info(
        "serving the control API ({}) on {}, mode {:04o}, {}", listener.role, path, listener.mode, who_may_use(listener)
    )


def tls_context(tls: ControlTls) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise CannotListen(
            f"daemon.control_tls: cannot load the certificate {tls.cert} with the key {tls.key}: "
            f"{getattr(exc, 'strerror', None) or exc}"
        ) from None
    return context


async def _serve_tcp(runner: web.AppRunner, listener: TcpListener) -> None:
    context = tls_context(listener.tls) if listener.tls is not None else None
    try:
        await web.TCPSite(runner, listener.host, listener.port, reuse_address=True, ssl_context=context).start()
    except OSError as exc:
        raise CannotListen(f"cannot listen on {listener} (daemon.control_listen): {exc.strerror or exc}") from None
    roles = ", ".join(
        f"{sum(r == role for _, r in listener.tokens)} {role}"
        for role in Role
        if any(r == role for _, r in listener.tokens)
    )
    logger.info(
        "serving the control API on {}://{} (Bearer tokens: {})", "https" if context else "http", listener, roles
    )
