"""supervisor.config.access and the control listeners: roles, tokens, role sockets and TLS, on real sockets, no engine.

The apps served here have no fleet: every request checked is refused (or let through to a handler that
needs none) before anything else runs. A whole daemon with roles is in tests/integration/test_roles.py.
"""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import ssl
import stat
import subprocess
from pathlib import Path

import aiohttp
import pytest
from pydantic import ValidationError

from supervisor.api.control import ROUTES, create_control_app, open_control, remove_sockets
from supervisor.cli.target import choose_socket
from supervisor.config.access import (
    ROUTE_ROLES,
    ControlTls,
    ControlToken,
    Role,
    RoleSocket,
    SocketListener,
    TcpListener,
    is_loopback,
    plan_listeners,
    role_socket_path,
    unreachable_by_role,
    ways_to_roles,
)
from supervisor.config.settings import load_config
from supervisor.core.errors import CannotListen, ConfigError

from .conftest import LOCALLLMCTL

VIEWER_TOKEN = "viewer-" + "v" * 40
OPERATOR_TOKEN = "operator-" + "o" * 40
ADMIN_TOKEN = "admin-" + "a" * 40
TOKENS = ((VIEWER_TOKEN, Role.VIEWER), (OPERATOR_TOKEN, Role.OPERATOR), (ADMIN_TOKEN, Role.ADMIN))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bare_app(gate):
    """The control app with nothing behind it: enough for the gate, /openapi.json and a bad body."""
    return create_control_app(None, None, None, None, gate)


async def ask(session: aiohttp.ClientSession, method: str, url: str, token: str | None = None, **kwargs):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.request(method, url, headers=headers, **kwargs) as response:
        return response.status, await response.json(content_type=None)


# -- roles and settings ---------------------------------------------------------------------


def test_each_role_has_everything_of_the_one_before():
    assert [r.allows(Role.VIEWER) for r in Role] == [True, True, True]
    assert [r.allows(Role.OPERATOR) for r in Role] == [False, True, True]
    assert [r.allows(Role.ADMIN) for r in Role] == [False, False, True]


def test_every_served_route_has_the_role_the_issue_gives_it():
    served = {(method, path) for method, path, _ in ROUTES} | {("GET", "/metrics")}
    assert set(ROUTE_ROLES) == served
    by_role = {role: {route for route, r in ROUTE_ROLES.items() if r is role} for role in Role}
    assert by_role[Role.OPERATOR] == {("POST", "/models/{name}/load"), ("POST", "/models/{name}/unload")}
    assert by_role[Role.ADMIN] == {("POST", "/apply"), ("POST", "/rollback"), ("GET", "/models/{name}/logs")}
    assert {path for _, path in by_role[Role.VIEWER]} == {
        "/openapi.json",
        "/health",
        "/status",
        "/models",
        "/models/{name}",
        "/models/{name}/memory",
        "/events",
        "/metrics",
        "/history",
        "/validate",
    }


def test_a_token_needs_32_printable_characters():
    short = "s3cret-" + "x" * 24  # 31 characters
    with pytest.raises(ValidationError) as caught:
        ControlToken(token=short, role="viewer")
    [error] = caught.value.errors()
    assert error["msg"] == (
        "Value error, a control token needs at least 32 characters, this one has 31 (make one "
        "with: openssl rand -hex 32)"
    )
    assert error["type"] == "value_error"  # the type whose input a config error never shows (schema._reason)
    with pytest.raises(ValidationError, match="printable ASCII without spaces"):
        ControlToken(token="with space " + "x" * 30, role="viewer")
    with pytest.raises(ValidationError, match="'viewer', 'operator' or 'admin'"):
        ControlToken(token="x" * 32, role="root")
    assert ControlToken(token="x" * 32, role="operator").role is Role.OPERATOR


def test_a_role_socket_needs_a_group_unless_everyone_may_use_it():
    with pytest.raises(ValidationError, match="a socket of mode 0660 needs 'group'"):
        RoleSocket()
    with pytest.raises(ValidationError, match="'group' has no effect on a socket of mode 0666"):
        RoleSocket(mode="0666", group="staff")
    assert RoleSocket(mode=0o666).mode == "0666"  # YAML 1.1 reads mode: 0666 as this number
    assert RoleSocket(group="staff", mode=0o660).mode == "0660"
    with pytest.raises(ValidationError):
        RoleSocket(group="staff", mode=660)  # decimal: not the mode it looks like
    with pytest.raises(ValidationError):
        RoleSocket(mode="0777")


def test_tls_paths_are_relative_to_the_config_file(tmp_path):
    tls = ControlTls.model_validate({"cert": "tls/cert.pem", "key": "/etc/key.pem"}, context={"base_dir": tmp_path})
    assert (tls.cert, tls.key) == (tmp_path / "tls" / "cert.pem", Path("/etc/key.pem"))


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("example.org", False),
    ],
)
def test_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_role_sockets_sit_beside_the_admin_socket():
    assert role_socket_path(Path("/var/lib/localllm/control.sock"), Role.VIEWER) == Path(
        "/var/lib/localllm/control-viewer.sock"
    )
    assert role_socket_path(Path("/run/llm.sock"), Role.OPERATOR) == Path("/run/llm-operator.sock")


def test_a_refusal_says_where_each_role_is_given():
    plan = [
        SocketListener(Role.ADMIN, Path("/s/control.sock"), "localllm", 0o660, "daemon.socket_group"),
        SocketListener(Role.OPERATOR, Path("/s/control-operator.sock"), "ops", 0o660, "x"),
        SocketListener(Role.VIEWER, Path("/s/control-viewer.sock"), None, 0o666, "x"),
        TcpListener("127.0.0.1", 8090, ((VIEWER_TOKEN, Role.VIEWER),), None),
    ]
    ways = ways_to_roles(plan)
    assert ways[Role.ADMIN] == "the socket /s/control.sock (group localllm)"
    assert (
        ways[Role.OPERATOR] == "the socket /s/control.sock (group localllm), or the socket /s/control-operator.sock "
        "(group ops)"
    )
    assert ways[Role.VIEWER].endswith(
        "the socket /s/control-viewer.sock (every local user), or a token with role "
        "viewer or operator or admin on the TCP control API (127.0.0.1:8090)"
    )
    assert VIEWER_TOKEN not in repr(plan)  # a listener in a log line shows no token


# -- the gate on a real TCP listener ---------------------------------------------------------


def test_tcp_tokens_give_their_roles():
    async def scenario():
        port = free_port()
        plan = [TcpListener("127.0.0.1", port, TOKENS, None)]
        runners = await open_control(plan, bare_app, 0.1)
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as session:
                for token in (None, "wrong-" + "w" * 40, VIEWER_TOKEN[:-1]):
                    for route in ("/openapi.json", "/no-such-route"):
                        status, body = await ask(session, "GET", url + route, token)
                        assert (status, body["error"]["code"]) == (401, "invalid_token")
                assert (await ask(session, "GET", url + "/openapi.json", VIEWER_TOKEN))[0] == 200
                status, body = await ask(session, "POST", url + "/apply", VIEWER_TOKEN, json={})
                assert (status, body["error"]["code"], body["error"]["needed_role"]) == (403, "forbidden", "admin")
                assert body["error"]["message"].startswith(
                    "POST /apply needs the admin role; this connection has "
                    "viewer. The admin role comes with a token with role admin"
                )
                status, body = await ask(session, "POST", url + "/models/m/load", VIEWER_TOKEN)
                assert (status, body["error"]["needed_role"]) == (403, "operator")
                status, body = await ask(session, "POST", url + "/apply", OPERATOR_TOKEN, json={})
                assert (status, body["error"]["needed_role"]) == (403, "admin")
                status, body = await ask(session, "GET", url + "/models/m/logs", OPERATOR_TOKEN)
                assert (status, body["error"]["needed_role"]) == (403, "admin")
                status, body = await ask(session, "POST", url + "/apply", ADMIN_TOKEN, json={})  # through the gate
                assert (status, body["error"]["code"]) == (400, "bad_request")
                status, body = await ask(session, "POST", url + "/apply", OPERATOR_TOKEN.replace("o", "0"), json={})
                assert status == 401
        finally:
            for runner in runners:
                await runner.cleanup()

    asyncio.run(scenario())


# -- unix sockets: mode, group, refusals -----------------------------------------------------


def my_group() -> tuple[str, int]:
    gid = os.getgroups()[0] if os.getgroups() else os.getgid()
    return grp.getgrgid(gid).gr_name, gid


def test_each_role_socket_has_its_mode_and_group_and_refuses_above_its_role(tmp_path):
    group, gid = my_group()
    plan = [
        SocketListener(Role.ADMIN, tmp_path / "control.sock", None, 0o660, "daemon.socket_group"),
        SocketListener(
            Role.OPERATOR, tmp_path / "control-operator.sock", group, 0o660, "daemon.role_sockets.operator.group"
        ),
        SocketListener(Role.VIEWER, tmp_path / "control-viewer.sock", None, 0o666, "daemon.role_sockets.viewer.group"),
    ]

    async def post(path: Path, route: str) -> tuple[int, dict]:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session:
            return await ask(session, "POST", f"http://localllmd{route}", json={})

    async def scenario():
        runners = await open_control(plan, bare_app, 0.1)
        try:
            modes = {p.name: (stat.S_IMODE(p.stat().st_mode), p.stat().st_gid) for p in tmp_path.iterdir()}
            assert modes == {
                "control.sock": (0o660, os.getegid()),
                "control-operator.sock": (0o660, gid),
                "control-viewer.sock": (0o666, os.getegid()),
            }
            status, body = await post(tmp_path / "control-viewer.sock", "/models/m/load")
            assert (status, body["error"]["needed_role"]) == (403, "operator")
            assert body["error"]["message"] == (
                f"POST /models/{{name}}/load needs the operator role; this connection has viewer. The operator role "
                f"comes with the socket {tmp_path}/control.sock (the daemon's own user and group), or the socket "
                f"{tmp_path}/control-operator.sock (group {group})"
            )
            status, body = await post(tmp_path / "control-operator.sock", "/apply")
            assert (status, body["error"]["needed_role"]) == (403, "admin")
            status, body = await post(tmp_path / "control.sock", "/apply")
            assert (status, body["error"]["code"]) == (400, "bad_request")  # admin: through to the handler
        finally:
            for runner in runners:
                await runner.cleanup()

    asyncio.run(scenario())


def test_a_file_in_a_sockets_place_is_left_alone(tmp_path):
    precious = tmp_path / "control-viewer.sock"
    precious.write_text("not a socket")
    plan = [
        SocketListener(Role.ADMIN, tmp_path / "control.sock", None, 0o660, "daemon.socket_group"),
        SocketListener(Role.VIEWER, precious, None, 0o666, "daemon.role_sockets.viewer.group"),
    ]
    with pytest.raises(CannotListen, match="something else is there"):
        asyncio.run(open_control(plan, bare_app, 0.1))
    assert precious.read_text() == "not a socket"
    assert (tmp_path / "control.sock").is_socket()  # opened before the failure, and closed by it
    remove_sockets(plan)  # as the daemon does when it stops
    assert precious.read_text() == "not a socket"
    assert not (tmp_path / "control.sock").exists()


def test_an_unknown_group_is_named_with_its_setting(tmp_path):
    plan = [
        SocketListener(
            Role.VIEWER, tmp_path / "v.sock", "no-such-group-here", 0o660, "daemon.role_sockets.viewer.group"
        )
    ]
    with pytest.raises(
        CannotListen, match="daemon.role_sockets.viewer.group: there is no group 'no-such-group-here' on this host"
    ):
        asyncio.run(open_control(plan, bare_app, 0.1))


def test_a_directory_closed_to_the_socket_group_is_found(open_dir):
    closed = open_dir / "closed"
    closed.mkdir()
    closed.chmod(0o750)
    gid = closed.stat().st_gid + 1  # a socket group other than the directory's
    problem = unreachable_by_role(closed / "control-viewer.sock", gid, 0o660)
    assert problem.startswith(f"{closed} (mode 0750) does not let the socket group reach")
    assert "chmod o+x" in problem
    assert unreachable_by_role(closed / "v.sock", gid, 0o666).startswith(f"{closed} (mode 0750) does not let every")
    closed.chmod(0o751)
    assert unreachable_by_role(closed / "control-viewer.sock", gid, 0o660) is None
    assert unreachable_by_role(closed / "control.sock", -1, 0o660) is None  # the daemon's own group
    closed.chmod(0o710)
    assert unreachable_by_role(closed / "control-viewer.sock", closed.stat().st_gid, 0o660) is None


def test_localllmctl_takes_the_most_capable_socket_it_may_open(tmp_path):
    paths = {role: tmp_path / f"{role}.sock" for role in Role}
    assert choose_socket(paths).socket == paths[Role.ADMIN]  # none there: connecting will say so
    for role in (Role.VIEWER, Role.OPERATOR):
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(paths[role]))
    chosen = choose_socket(paths)
    assert (chosen.socket, chosen.role) == (paths[Role.OPERATOR], Role.OPERATOR)
    assert str(chosen) == f"{paths[Role.OPERATOR]} (the operator socket)"
    assert choose_socket(paths, Role.VIEWER).socket == paths[Role.VIEWER]


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> ControlTls:
    """A self-signed certificate for 127.0.0.1 and localhost, made with the openssl command."""
    directory = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(directory / "key.pem"),
            "-out",
            str(directory / "cert.pem"),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return ControlTls(cert=directory / "cert.pem", key=directory / "key.pem")


def test_tcp_control_with_tls_answers_over_https_only(certificate, tmp_path):
    port = free_port()
    config = tmp_path / "change.yaml"
    config.write_text("models: []\n")

    async def localllmctl(*args: str, **env: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            LOCALLLMCTL,
            "--url",
            f"https://127.0.0.1:{port}",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "LOCALLLM_TOKEN": VIEWER_TOKEN, **env},
        )
        out, err = await process.communicate()
        return process.returncode, out.decode() + err.decode()

    async def scenario():
        runners = await open_control([TcpListener("127.0.0.1", port, TOKENS, certificate)], bare_app, 0.1)
        try:
            trusted = ssl.create_default_context(cafile=certificate.cert)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusted)) as session:
                status, body = await ask(session, "GET", f"https://127.0.0.1:{port}/openapi.json", VIEWER_TOKEN)
                assert status == 200 and body["openapi"].startswith("3.")
                status, body = await ask(session, "POST", f"https://127.0.0.1:{port}/apply", VIEWER_TOKEN, json={})
                assert (status, body["error"]["needed_role"]) == (403, "admin")
                status, body = await ask(session, "POST", f"https://127.0.0.1:{port}/apply", ADMIN_TOKEN, json={})
                assert (status, body["error"]["code"]) == (400, "bad_request")  # through the gate to the handler
            async with aiohttp.ClientSession() as session:
                with pytest.raises(aiohttp.ClientError):  # plain HTTP gets no answer from a TLS listener
                    await ask(session, "GET", f"http://127.0.0.1:{port}/openapi.json", VIEWER_TOKEN)
            code, out = await localllmctl("--cacert", str(certificate.cert), "apply", "--json", str(config))
            assert code == 1, out
            assert "POST /apply needs the admin role; this connection has viewer" in out
            assert f"localllmctl used https://127.0.0.1:{port}; choose another with its token ($LOCALLLM_TOKEN)" in out
            code, out = await localllmctl("apply", "--json", str(config))  # the system's CAs do not know it
            assert code == 3, out
            assert "certificate on https://127.0.0.1" in out and "is not trusted" in out and "--cacert" in out
        finally:
            for runner in runners:
                await runner.cleanup()

    asyncio.run(scenario())


def test_a_key_that_does_not_load_stops_the_listener_with_the_setting_named(certificate, tmp_path):
    bad = ControlTls(cert=certificate.cert, key=tmp_path / "missing.pem")
    with pytest.raises(CannotListen, match="daemon.control_tls: cannot load the certificate .* with the key"):
        asyncio.run(open_control([TcpListener("127.0.0.1", free_port(), TOKENS, bad)], bare_app, 0.1))


# -- the settings in a config file (these need the roles wiring of config.py) ---------------------------------


def test_the_settings_plan_one_listener_per_role(config_file, tmp_path):
    path = config_file(f"""\
        daemon:
          state_dir: {tmp_path}/state
          socket_group: localllm
          role_sockets:
            operator: {{group: ops, path: ops.sock}}
            viewer: {{mode: 0666}}
          control_listen: 127.0.0.1:8090
          control_token: {ADMIN_TOKEN}
          control_tokens:
            - {{token: {VIEWER_TOKEN}, role: viewer}}
        """)
    daemon = load_config(path).daemon
    assert plan_listeners(daemon) == [
        SocketListener(Role.ADMIN, tmp_path / "state" / "control.sock", "localllm", 0o660, "daemon.socket_group"),
        SocketListener(Role.OPERATOR, tmp_path / "ops.sock", "ops", 0o660, "daemon.role_sockets.operator.group"),
        SocketListener(
            Role.VIEWER, tmp_path / "state" / "control-viewer.sock", None, 0o666, "daemon.role_sockets.viewer.group"
        ),
        TcpListener("127.0.0.1", 8090, ((ADMIN_TOKEN, Role.ADMIN), (VIEWER_TOKEN, Role.VIEWER)), None),
    ]


def test_a_config_of_before_roles_means_what_it_meant(config_file, tmp_path):
    path = config_file(f"""\
        daemon:
          control_socket: {tmp_path}/llm.sock
          socket_group: localllm
          control_listen: 127.0.0.1:8090
          control_token: {ADMIN_TOKEN}
        """)
    daemon = load_config(path).daemon
    assert plan_listeners(daemon) == [
        SocketListener(Role.ADMIN, tmp_path / "llm.sock", "localllm", 0o660, "daemon.socket_group"),
        TcpListener("127.0.0.1", 8090, ((ADMIN_TOKEN, Role.ADMIN),), None),
    ]


def test_a_config_error_about_a_token_never_shows_it(config_file):
    token = "old-sixteen-char"
    path = config_file(f"daemon:\n  control_listen: 127.0.0.1:8090\n  control_token: {token}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path}:3: daemon.control_token: a control token needs at least 32 characters, "
        "this one has 16 (make one with: openssl rand -hex 32)"
    ]
    assert token not in caught.value.message


def test_a_self_signed_certificate_passes_the_config_check(config_file, certificate):
    path = config_file(f"""\
        daemon:
          control_listen: 0.0.0.0:8090
          control_tokens: [{{token: {VIEWER_TOKEN}, role: viewer}}]
          control_tls: {{cert: {certificate.cert}, key: {certificate.key}}}
        """)
    assert load_config(path).daemon.control_tls == certificate
