"""Who may do what on the control API: roles, the settings that hand them out, and the listeners.

Three roles, each with everything of the one before it:
- ``viewer``: status, models, memory estimates, events, metrics, health, history, the
  OpenAPI document, and validating a config (which changes nothing);
- ``operator``: also load and unload models;
- ``admin``: also apply and roll back configs, and read container logs. Applying a config
  drives the Docker socket, so admin is root on the host, bounded by ``daemon.policy``.

On the host, each role has a unix socket, and the kernel decides who may connect by the
socket file's mode and group: ``daemon.control_socket`` (group ``daemon.socket_group``) is
the admin socket, as it always was, and ``daemon.role_sockets`` adds one for viewers and one
for operators. The admin socket belongs to the daemon's own user, so that user (and root)
always has admin. Over TCP (``daemon.control_listen``) a caller is known by its Bearer
token (``daemon.control_tokens``, each with a role; ``daemon.control_token`` is one admin
token), compared in constant time. Off loopback, TCP control needs TLS (``control_tls``).

``plan_listeners`` is pure: the settings in, the listeners to open out; ``control.open_control``
opens them, each with an app whose ``Gate`` tells the caller's role.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from pydantic import AfterValidator, BeforeValidator, ValidationInfo, field_validator, model_validator

from supervisor.config.schema import Problem, Strict
from supervisor.config.yamldoc import Loc, format_loc
from supervisor.core.errors import Forbidden, InvalidToken

if TYPE_CHECKING:
    from supervisor.config.settings import DaemonSettings

TOKEN_MIN_LENGTH = 32


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(Role).index(self)

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


ROUTE_ROLES = {  # (method, path) of each control route -> the least role that may call it
    **dict.fromkeys(
        (
            ("GET", "/openapi.json"),
            ("GET", "/health"),
            ("GET", "/status"),
            ("GET", "/models"),
            ("GET", "/models/{name}"),
            ("GET", "/models/{name}/memory"),
            ("GET", "/events"),
            ("GET", "/metrics"),
            ("GET", "/history"),
            ("POST", "/validate"),
        ),
        Role.VIEWER,
    ),
    **dict.fromkeys((("POST", "/models/{name}/load"), ("POST", "/models/{name}/unload")), Role.OPERATOR),
    # Logs may quote what users sent; apply and rollback drive the Docker socket.
    **dict.fromkeys((("GET", "/models/{name}/logs"), ("POST", "/apply"), ("POST", "/rollback")), Role.ADMIN),
}


def _check_token(token: str) -> str:
    """A Bearer token: long enough not to be guessed, and sendable in a header. Never echoed in errors."""
    if len(token) < TOKEN_MIN_LENGTH:
        raise ValueError(
            f"a control token needs at least {TOKEN_MIN_LENGTH} characters, this one has {len(token)} "
            "(make one with: openssl rand -hex 32)"
        )
    if not all(33 <= ord(c) <= 126 for c in token):
        raise ValueError("a control token must be printable ASCII without spaces (make one with: openssl rand -hex 32)")
    return token


Token = Annotated[str, AfterValidator(_check_token)]


class ControlToken(Strict):
    """One Bearer token of the TCP control API and the role it gives."""

    token: Token
    role: Role


def _octal_mode(value: object) -> object:
    """YAML 1.1 reads ``mode: 0660`` as the octal number; either spelling means the same mode."""
    return {0o660: "0660", 0o666: "0666"}.get(value, value) if isinstance(value, int) else value


class RoleSocket(Strict):
    """The unix socket of one role below admin."""

    path: Path | None = None  # default: beside the admin socket, control-<role>.sock
    group: str | None = None  # the group whose members get the role (mode 0660)
    mode: Annotated[Literal["0660", "0666"], BeforeValidator(_octal_mode)] = "0660"  # 0666: every local user

    @model_validator(mode="after")
    def _group_fits_mode(self) -> RoleSocket:
        if self.mode == "0660" and not self.group:
            raise ValueError(
                "a socket of mode 0660 needs 'group': the group whose members get this role "
                '(or mode: "0666" to give it to every local user)'
            )
        if self.mode == "0666" and self.group:
            raise ValueError("'group' has no effect on a socket of mode 0666, which every local user may use")
        return self

    @field_validator("path")
    @classmethod
    def _path_relative_to_config(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return _relative_to_config(path, info) if path is not None else None


def _roles_below_admin(value: object) -> object:
    if isinstance(value, dict):
        for key in value:
            if key == Role.ADMIN:
                raise ValueError("the admin socket is daemon.control_socket, with group daemon.socket_group")
            if key not in (Role.VIEWER, Role.OPERATOR):
                raise ValueError(f"'{key}' is not a role with a socket of its own (viewer, operator)")
    return value


RoleSockets = Annotated[dict[Role, RoleSocket], BeforeValidator(_roles_below_admin)]


class ControlTls(Strict):
    """The certificate (chain) and private key the TCP control API serves, in PEM files."""

    cert: Path
    key: Path

    @field_validator("cert", "key")
    @classmethod
    def _relative(cls, path: Path, info: ValidationInfo) -> Path:
        return _relative_to_config(path, info)


def _relative_to_config(path: Path, info: ValidationInfo) -> Path:
    """As config.relative_to_config: relative paths in a config file are relative to its directory."""
    base = (info.context or {}).get("base_dir")
    path = path.expanduser()
    return (base / path) if base and not path.is_absolute() else path


# -- checks across settings (config.load_config calls control_problems) -------------------


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``; any other name counts as reachable from elsewhere (no DNS here)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def role_socket_path(admin_socket: Path, role: Role) -> Path:
    """Where a role's socket is when its path is not set: beside the admin socket (control-viewer.sock)."""
    return admin_socket.with_name(f"{admin_socket.stem}-{role}{admin_socket.suffix}")


def socket_paths(daemon: DaemonSettings) -> dict[Role, Path]:
    """Each role's socket path; the admin one always, the others when configured."""
    paths = {Role.ADMIN: daemon.socket_path}
    for role, settings in daemon.role_sockets.items():
        paths[role] = settings.path or role_socket_path(daemon.socket_path, role)
    return paths


def all_tokens(daemon: DaemonSettings) -> list[tuple[Loc, str, Role]]:
    """(location, token, role) of every control token: control_token (admin), then control_tokens."""
    found: list[tuple[Loc, str, Role]] = []
    if daemon.control_token:
        found.append((("daemon", "control_token"), daemon.control_token, Role.ADMIN))
    found += [(("daemon", "control_tokens", i, "token"), t.token, t.role) for i, t in enumerate(daemon.control_tokens)]
    return found


def control_problems(daemon: DaemonSettings, check_files: bool = True) -> list[Problem]:
    """Problems that span the control settings: (location, reason) pairs, as config.check_ports gives."""
    problems: list[Problem] = []
    tokens = all_tokens(daemon)
    listen = daemon.control_listen
    if listen is not None and not tokens:
        problems.append(
            (
                ("daemon", "control_listen"),
                "control_listen needs control_tokens (or control_token, an "
                "admin token): the TCP control API always asks for a Bearer "
                "token (make one with: openssl rand -hex 32)",
            )
        )
    if listen is not None and not is_loopback(listen.host) and daemon.control_tls is None:
        problems.append(
            (
                ("daemon", "control_listen"),
                f"control_listen {listen} is not a loopback address: it needs "
                "control_tls (cert and key), or tokens would cross the network "
                "in clear text",
            )
        )
    seen: dict[str, Loc] = {}
    api_keys = set(daemon.api_keys)
    for loc, token, _ in tokens:
        if token in seen:
            problems.append((loc, f"the same token as {format_loc(seen[token])}: each token gives one role"))
        seen.setdefault(token, loc)
        if token in api_keys:
            problems.append(
                (loc, "this token is also one of daemon.api_keys: a proxy client could use it on the control API")
            )
    used: dict[Path, Role] = {}
    for role, path in socket_paths(daemon).items():
        if path in used:
            problems.append(
                (
                    ("daemon", "role_sockets", str(role), "path"),
                    f"{path} is also the {used[path]} socket: each role needs a socket of its own",
                )
            )
        used.setdefault(path, role)
    tls = daemon.control_tls
    if tls is not None and check_files:
        for name in ("cert", "key"):
            reason = _unreadable(getattr(tls, name))
            if reason:
                problems.append((("daemon", "control_tls", name), reason))
    return problems


def _unreadable(path: Path) -> str | None:
    try:
        with path.open("rb"):
            return None
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"


# -- the listeners ------------------------------------------------------------------------


@dataclass(frozen=True)
class SocketListener:
    role: Role
    path: Path
    group: str | None  # None: the daemon's own group
    mode: int
    group_setting: str  # the setting that names the group, for errors


@dataclass(frozen=True)
class TcpListener:
    host: str
    port: int
    tokens: tuple[tuple[str, Role], ...] = field(repr=False)
    tls: ControlTls | None

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


Listener = SocketListener | TcpListener


def plan_listeners(daemon: DaemonSettings) -> list[Listener]:
    """Pure: the control listeners ``daemon`` asks for, the most capable first."""
    paths = socket_paths(daemon)
    plan: list[Listener] = [
        SocketListener(Role.ADMIN, paths[Role.ADMIN], daemon.socket_group, 0o660, "daemon.socket_group")
    ]
    for role in (Role.OPERATOR, Role.VIEWER):
        settings = daemon.role_sockets.get(role)
        if settings is not None:
            plan.append(
                SocketListener(
                    role, paths[role], settings.group, int(settings.mode, 8), f"daemon.role_sockets.{role}.group"
                )
            )
    if daemon.control_listen is not None:
        listen = daemon.control_listen
        plan.append(
            TcpListener(listen.host, listen.port, tuple((t, r) for _, t, r in all_tokens(daemon)), daemon.control_tls)
        )
    return plan


def ways_to_roles(plan: list[Listener]) -> dict[Role, str]:
    """For each role, in words, which sockets and tokens give it: what a refused caller is told."""
    ways = {}
    for role in Role:
        sockets = [
            f"the socket {s.path} ({who_may_use(s)})"
            for s in plan
            if isinstance(s, SocketListener) and s.role.allows(role)
        ]
        tcp = [t for t in plan if isinstance(t, TcpListener)]
        if tcp and any(r.allows(role) for _, r in tcp[0].tokens):
            names = " or ".join(r for r in Role if r.allows(role))
            sockets.append(f"a token with role {names} on the TCP control API ({tcp[0]})")
        ways[role] = ", or ".join(sockets)
    return ways


def who_may_use(listener: SocketListener) -> str:
    if listener.mode & 0o006:
        return "every local user"
    return f"group {listener.group}" if listener.group else "the daemon's own user and group"


def unreachable_by_role(path: Path, gid: int, mode: int) -> str | None:
    """Why those the socket is meant for cannot even reach its path, if so: a directory above it they may not
    search (a state directory of 0750, as installed before roles; install.sh now makes it 0751)."""
    for_anyone = bool(mode & 0o006)
    if not for_anyone and gid < 0:
        return None  # the daemon's own user and group: its state directory is theirs
    for directory in path.parents:
        try:
            info = directory.stat()
        except OSError:
            return None
        if info.st_mode & stat.S_IXOTH:
            continue
        if not for_anyone and info.st_gid == gid and info.st_mode & stat.S_IXGRP:
            continue
        return (
            f"{directory} (mode {stat.S_IMODE(info.st_mode):04o}) does not let "
            f"{'every local user' if for_anyone else 'the socket group'} reach {path}: "
            f"chmod o+x {directory}, or choose a path they can reach"
        )
    return None


@dataclass(frozen=True)
class Gate:
    """How one listener knows its caller's role: the socket's own role, or the Bearer token's."""

    role: Role | None = None  # a unix socket's role
    tokens: tuple[tuple[bytes, Role], ...] = field(default=(), repr=False)  # TCP: sha256 of each token, its role
    ways: dict[Role, str] = field(default_factory=dict)  # how to get each role, for refusals

    @classmethod
    def for_tokens(cls, tokens: Iterable[tuple[str, str]], ways: dict[Role, str] | None = None) -> Gate:
        return cls(None, tuple((_digest(t), Role(r)) for t, r in tokens), ways or {})

    def identify(self, request: web.Request) -> Role:
        if self.role is not None:
            return self.role
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        digest, found = _digest(given.strip()), None
        for expected, role in self.tokens:  # every one, whatever matched: the time says nothing
            if hmac.compare_digest(digest, expected):
                found = role
        if scheme.lower() != "bearer" or found is None:
            raise InvalidToken(
                "missing or wrong token: the TCP control API needs 'Authorization: Bearer <token>' "
                "with a token of daemon.control_tokens (or daemon.control_token)"
            )
        return found

    def middleware(self, needed: dict[tuple[str, str], Role]) -> Middleware:
        """Identify every request (401 for a wrong token, even on an unknown route), then check its role (403)."""

        @web.middleware
        async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
            role = self.identify(request)
            resource = request.match_info.route.resource
            method = "GET" if request.method == "HEAD" else request.method
            if resource is not None:
                # A route missing from the table needs admin: a new route is closed until it is given a role.
                want = needed.get((method, resource.canonical), Role.ADMIN)
                if not role.allows(want):
                    how = self.ways.get(want)
                    raise Forbidden(
                        f"{method} {resource.canonical} needs the {want} role; this connection has "
                        f"{role}" + (f". The {want} role comes with {how}" if how else ""),
                        str(want),
                    )
            return await handler(request)

        return check


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def gate_for(listener: Listener, ways: dict[Role, str]) -> Gate:
    if isinstance(listener, SocketListener):
        return Gate(listener.role, (), ways)
    return Gate.for_tokens(listener.tokens, ways)
