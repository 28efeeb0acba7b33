"""supervisor.runtime.upstream: the socket directories and the one session that reaches sockets and ports alike."""

from __future__ import annotations

import asyncio
import os
import socket
import stat

from aiohttp import web

from supervisor.core.containers import SOCKET_NAME, Endpoint, servers_dir
from supervisor.runtime.upstream import make_socket_dir, open_session, sweep_socket_dirs

ENDPOINT = Endpoint(socket="0123456789abcdef")


def test_a_socket_directory_is_private_fresh_and_inside_a_private_parent(tmp_path):
    servers = servers_dir(tmp_path)
    servers.mkdir(mode=0o755)  # an older, looser mode is tightened
    stale = servers / ENDPOINT.socket
    stale.mkdir()
    (stale / SOCKET_NAME).write_text("a stale socket file")
    path = make_socket_dir(servers, ENDPOINT, (os.geteuid(), os.getegid()))
    assert path == stale and list(path.iterdir()) == []
    assert (stat.S_IMODE(servers.stat().st_mode), stat.S_IMODE(path.stat().st_mode)) == (0o700, 0o700)


def test_a_socket_directory_belongs_to_the_servers_user_when_the_daemon_is_root(tmp_path):
    # only root may give a directory away: the suite runs as root (it drives the engine and network namespaces)
    path = make_socket_dir(servers_dir(tmp_path), ENDPOINT, (65534, 65534))
    assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534)


def test_the_sweep_removes_everything_but_the_directories_in_use(tmp_path):
    servers = servers_dir(tmp_path)
    kept = make_socket_dir(servers, ENDPOINT, (os.geteuid(), os.getegid()))
    make_socket_dir(servers, Endpoint(socket="fedcba9876543210"), (os.geteuid(), os.getegid()))
    (servers / "stray-file").write_text("x")
    (servers / "a-link").symlink_to(tmp_path)
    assert sweep_socket_dirs(servers, {ENDPOINT.socket}) == ["a-link", "fedcba9876543210", "stray-file"]
    assert list(servers.iterdir()) == [kept] and tmp_path.is_dir()


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text=f"hello from {request.path}")


def test_the_session_reaches_a_socket_whose_path_is_longer_than_sun_path_and_a_port(tmp_path):
    state = tmp_path / ("d" * 60) / ("e" * 60)  # the socket's path is well over 108 bytes
    directory = make_socket_dir(servers_dir(state), ENDPOINT, (os.geteuid(), os.getegid()))
    assert len(str(directory / SOCKET_NAME)) > 108

    async def scenario():
        app = web.Application()
        app.router.add_get("/{tail:.*}", _hello)
        runner = web.AppRunner(app)
        await runner.setup()
        listening = socket.socket(socket.AF_UNIX)
        fd = os.open(directory, os.O_PATH)
        try:
            listening.bind(f"/proc/self/fd/{fd}/{SOCKET_NAME}")
        finally:
            os.close(fd)
        await web.SockSite(runner, listening).start()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[-1][1]
        try:
            async with open_session(servers_dir(state)) as session:
                async with session.get(ENDPOINT.url + "/health") as on_socket:
                    via_socket = await on_socket.text()
                async with session.get(Endpoint(port=port).url + "/v1/models") as on_port:
                    via_port = await on_port.text()
            return via_socket, via_port
        finally:
            await runner.cleanup()

    assert asyncio.run(scenario()) == ("hello from /health", "hello from /v1/models")


def test_a_missing_socket_is_a_connection_error_naming_it(tmp_path):
    async def scenario():
        async with open_session(servers_dir(tmp_path)) as session:
            try:
                await session.get(ENDPOINT.url + "/health")
            except OSError as exc:
                return str(exc)
        return "connected"

    assert f"{ENDPOINT.socket}/{SOCKET_NAME}" in asyncio.run(scenario())
