"""localllmctl's side of the control API: one request, or a stream of lines or server-sent events.

Every wait has a deadline (``ControlClient.timeout``; localllmctl's ``--timeout``). A call that is answered at once
(status, health, history) must be answered whole within it. A stream (logs, events) must open within it, and then
lasts as long as it lasts. A long action (a load, an apply) is only bounded while connecting: its answer comes when
the action is done, and localllmctl first opens the event stream, within the deadline, to know that the daemon
answers at all. A daemon whose event loop is stopped or stuck still has its connections accepted by the kernel,
so a deadline is the only way to tell; past it, DaemonUnresponsive names the address and the deadline.
"""

from __future__ import annotations

import asyncio
import grp
import json
import ssl
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote as _quote

import aiohttp

from supervisor.core.errors import ControlUnreachable, RemoteError

DEFAULT_TIMEOUT = 30.0  # seconds localllmctl waits for an answer (status --check: ctl_target.CHECK_TIMEOUT)


@dataclass(frozen=True)
class Target:
    """Where the daemon's control API is: a unix socket (and its role, when known), or a TCP URL with its token."""

    socket: Path | None = None
    url: str | None = None
    token: str | None = None
    role: str | None = None
    cacert: Path | None = None  # https: the CA (or the certificate) to trust instead of the system's CAs

    def __str__(self) -> str:
        if self.url:
            return self.url
        return f"{self.socket} (the {self.role} socket)" if self.role else str(self.socket)

    def tls(self) -> ssl.SSLContext | None:
        if not (self.url or "").startswith("https:"):
            return None
        try:
            return ssl.create_default_context(cafile=self.cacert)
        except (OSError, ssl.SSLError) as exc:
            raise ControlUnreachable(
                f"cannot use the CA certificate {self.cacert}: {getattr(exc, 'strerror', None) or exc}"
            ) from None


class DaemonUnresponsive(ControlUnreachable):
    """The daemon took the connection and did not answer within the deadline: stopped, stuck or overloaded.

    localllmctl's own: it has ControlUnreachable's code (and exit status 3), as no answer of the daemon carries it.
    """


class ControlClient:
    def __init__(self, target: Target, timeout: float | None = DEFAULT_TIMEOUT):
        self.target = target
        self.timeout = timeout or None  # 0 or None: no deadline

    @asynccontextmanager
    async def _session(self):
        if self.target.url:
            context = self.target.tls()
            connector = aiohttp.TCPConnector(ssl=context) if context else aiohttp.TCPConnector()
            base = self.target.url.rstrip("/")
        else:
            connector, base = aiohttp.UnixConnector(path=str(self.target.socket)), "http://localllmd"
        headers = {"Authorization": f"Bearer {self.target.token}"} if self.target.token else {}
        limits = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout)
        try:
            async with aiohttp.ClientSession(base, connector=connector, headers=headers, timeout=limits) as session:
                yield session
        except aiohttp.ClientConnectorCertificateError as exc:
            raise ControlUnreachable(
                f"localllmd's certificate on {self.target} is not trusted: "
                f"{exc.certificate_error}; give the CA that signed it (or the certificate "
                "itself) with --cacert FILE or $LOCALLLM_CACERT"
            ) from None
        except (aiohttp.ClientConnectionError, FileNotFoundError, PermissionError) as exc:
            if isinstance(exc, TimeoutError):  # connecting took longer than the deadline
                raise self._unresponsive("took no connection") from None
            if self.target.socket and isinstance(getattr(exc, "os_error", exc), PermissionError):
                raise ControlUnreachable(
                    f"you may not use the control socket {self.target}: {who_may_use(self.target.socket)}"
                ) from None
            raise ControlUnreachable(f"localllmd is not reachable on {self.target}: {exc}") from None

    @asynccontextmanager
    async def _deadline(self, what: str, seconds: float | None):
        try:
            async with asyncio.timeout(seconds):
                yield
        except TimeoutError:
            raise self._unresponsive(f"did not answer {what}") from None

    def _unresponsive(self, what: str) -> DaemonUnresponsive:
        return DaemonUnresponsive(
            f"localllmd on {self.target} {what} within {self.timeout:g}s "
            "(--timeout): it is stopped, stuck or overloaded; its log may say why "
            "(journalctl -u localllm)"
        )

    async def request(
        self, method: str, route: str, body: dict | None = None, params: dict | None = None, long: bool = False
    ) -> dict:
        """One call; an error answer becomes a RemoteError carrying its stable code.

        ``long``: an action that takes as long as it takes (a load, an apply); only connecting has a deadline.
        """
        async with self._session() as session, self._deadline(f"{method} {route}", None if long else self.timeout):
            async with session.request(method, route, json=body, params=params) as response:
                answer = await response.json(content_type=None)
                self._raise_for_error(response.status, answer)
                return answer

    async def get(self, route: str, params: dict | None = None) -> dict:
        return await self.request("GET", route, params=params)

    @asynccontextmanager
    async def _stream(self, route: str, params: dict | None):
        """A streamed answer: its head (or its error, whole) within the deadline; then no deadline."""
        async with self._session() as session:
            async with self._deadline(f"GET {route}", self.timeout):
                response = await session.get(route, params=params)
                if response.status >= 400:
                    async with response:
                        self._raise_for_error(response.status, await response.json(content_type=None))
            async with response:
                yield response

    async def lines(self, route: str, params: dict | None = None) -> AsyncIterator[str]:
        """A streamed text answer, line by line (container logs)."""
        async with self._stream(route, params) as response:
            async for raw in response.content:
                yield raw.decode(errors="replace").rstrip("\n")

    async def events(self, params: dict | None = None, on_open=None) -> AsyncIterator[dict]:
        """The daemon's event stream: each ``data:`` payload of the SSE answer, parsed.

        ``on_open`` is called once the daemon has subscribed us: no later event can be missed.
        """
        async with self._stream("/events", params) as response:
            if on_open is not None:
                on_open()
            kind = ""
            async for raw in response.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data = json.loads(line[5:])
                    if kind == "overflow":
                        raise RemoteError(f"events: {data.get('message', 'too slow')}", "overflow")
                    yield data

    def _raise_for_error(self, status: int, answer: object) -> None:
        if status < 400:
            return
        error = answer.get("error", {}) if isinstance(answer, dict) else {}
        message = error.get("message", f"HTTP {status}")
        if error.get("code") == "forbidden":  # the daemon said which role and how to get it; say what we used
            how = "its token ($LOCALLLM_TOKEN)" if self.target.url else "--role, --socket or --url"
            message += f"\nlocalllmctl used {self.target}; choose another with {how}"
        raise RemoteError(message, error.get("code", ""), answer if isinstance(answer, dict) else None)


def who_may_use(path: Path) -> str:
    """Who may open a socket, as its mode and group say: what a user refused at connect() is told."""
    try:
        info = path.stat()
    except OSError as exc:
        return f"cannot even look at it ({exc.strerror}): a directory above it is closed to you"
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    mode = stat.S_IMODE(info.st_mode)
    if not mode & 0o020:
        return f"it is mode {mode:04o}: only its owner (uid {info.st_uid}) may"
    return (
        f"it is mode {mode:04o}, group {group}: join that group (sudo usermod -a -G {group} $USER, then log in "
        "again), or use another role's socket (--role viewer, --role operator)"
    )


def quote(name: str) -> str:
    """A model name as one path segment (names may hold '/' and ':')."""
    return _quote(name, safe="")
