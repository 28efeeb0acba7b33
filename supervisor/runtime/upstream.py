"""How localllm reaches its model servers: one HTTP client session for sockets and ports alike.

Every model server listens on a UNIX socket in a directory of its own under
``<state_dir>/servers/`` (llama-server itself, with no network; Ollama through its
relay, ``backends/ollama_relay.py``). The directory tree is the lock:
``servers/`` is 0700 and the daemon's, and each server's directory is 0700 and
belongs to the user the server runs as (the daemon's own, or nobody when the
daemon is root, which can reach any file). No other local user can even look
up the socket's path, so none can connect, squat or impersonate it.

The socket's URL is ``http://<name>.sock.localllm/...``: ``ServerConnector``
sends a host of that shape to ``servers/<name>/http.sock`` and everything
else over TCP, so the proxy, the health gate and liveness need not know which
kind of endpoint a server has.

The session carries the daemon's ``Timeouts`` (``daemon.timeouts``): connecting gives up after
``upstream_connect`` on every request that does not say otherwise, and ``timeouts_of(session)`` gives
the rest to those that talk to a server through it (``ollama_api``).
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import aiohttp
from aiohttp.client_exceptions import UnixClientConnectorError
from aiohttp.helpers import ceil_timeout

from supervisor.config.settings import Timeouts
from supervisor.core.containers import SOCKET_HOST_SUFFIX, SOCKET_NAME, Endpoint

NOBODY = (65534, 65534)


def server_user() -> tuple[int, int]:
    """Who a socket-listening server runs as: the daemon's own user, so that the daemon may connect to the
    socket it makes; nobody when the daemon is root (root connects to any socket, and no server runs as root)."""
    return NOBODY if os.geteuid() == 0 else (os.geteuid(), os.getegid())


class ServerConnector(aiohttp.TCPConnector):
    """TCP, except for hosts ending in ``.sock.localllm``: those are sockets under ``servers_dir``.

    The sockets are reached through a descriptor of ``servers_dir`` (``/proc/self/fd/N/<name>/http.sock``),
    so that a long state directory cannot make their paths longer than the 107 bytes the kernel allows.
    """

    def __init__(self, servers_dir: Path, timeouts: Timeouts | None = None, **kwargs):
        super().__init__(**kwargs)
        self.timeouts = timeouts or Timeouts()
        servers_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._servers_fd = os.open(servers_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def socket_path(self, name: str) -> str:
        return f"/proc/self/fd/{self._servers_fd}/{name}/{SOCKET_NAME}"

    async def close(self, *args, **kwargs):
        try:
            return await super().close(*args, **kwargs)
        finally:
            if self._servers_fd >= 0:
                os.close(self._servers_fd)
                self._servers_fd = -1

    async def _create_connection(self, req, traces, timeout):
        host = req.url.raw_host or ""
        if not host.endswith(SOCKET_HOST_SUFFIX):
            return await super()._create_connection(req, traces, timeout)
        path = self.socket_path(host.removesuffix(SOCKET_HOST_SUFFIX))
        try:
            async with ceil_timeout(timeout.sock_connect, ceil_threshold=timeout.ceil_threshold):
                _, protocol = await self._loop.create_unix_connection(self._factory, path)
        except OSError as exc:
            if exc.errno is None and isinstance(exc, TimeoutError):
                raise
            raise UnixClientConnectorError(path, req.connection_key, exc) from exc
        return protocol


def open_session(servers_dir: Path, timeouts: Timeouts | None = None) -> aiohttp.ClientSession:
    """The daemon's one client session for every model server, with ``timeouts`` (default: the settings')."""
    timeouts = timeouts or Timeouts()
    return aiohttp.ClientSession(
        # llama-server drops idle keep-alive connections after 5 s: never reuse one that old
        connector=ServerConnector(servers_dir, timeouts, limit=0, ttl_dns_cache=None, keepalive_timeout=4),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeouts.upstream_connect),
    )


def timeouts_of(session: aiohttp.ClientSession) -> Timeouts:
    """The timeouts ``session`` was opened with (``open_session``); the defaults for any other session."""
    connector = session.connector
    return connector.timeouts if isinstance(connector, ServerConnector) else Timeouts()


def make_socket_dir(servers_dir: Path, endpoint: Endpoint, user: tuple[int, int]) -> Path:
    """A fresh, empty directory for ``endpoint``'s socket, only ``user`` (the server's) may enter.

    ``servers_dir`` is made 0700 for the daemon; a stale directory of the same name is replaced (the
    server could not bind a socket path that exists). A daemon that may not give the directory away (not
    root, and the server another user: an Ollama store of someone else's) leaves it open to all, 0777:
    ``servers_dir`` above it still lets no one else in, and the relay makes its socket 0666.
    """
    servers_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(servers_dir, 0o700)  # an older, looser mode is tightened
    path = servers_dir / endpoint.socket
    remove_socket_dir(servers_dir, endpoint)
    path.mkdir(mode=0o700)
    if (os.geteuid(), os.getegid()) != user:
        try:
            os.chown(path, *user)
        except PermissionError:
            os.chmod(path, 0o777)
    return path


def remove_socket_dir(servers_dir: Path, endpoint: Endpoint) -> None:
    if endpoint.socket is not None:
        _remove(servers_dir / endpoint.socket)


def sweep_socket_dirs(servers_dir: Path, in_use: set[str]) -> list[str]:
    """Remove whatever is in ``servers_dir`` besides the socket directories in use; return the names removed."""
    if not servers_dir.is_dir():
        return []
    gone = sorted(entry.name for entry in servers_dir.iterdir() if entry.name not in in_use)
    for name in gone:
        _remove(servers_dir / name)
    return gone


def _remove(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not stat.S_ISDIR(path.lstat().st_mode)):
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)
