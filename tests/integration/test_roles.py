"""Roles on the control plane, checked as other users (setpriv: the user nobody with chosen groups).

The first tests serve the control app on real sockets in the test itself, so they need nothing but the
kernel; the last ones run a whole daemon configured with role sockets, tokens and TLS.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest
import requests
import yaml

from supervisor.api.control import create_control_app, open_control
from supervisor.config.access import Role, SocketListener, TcpListener

from .conftest import executable, free_tcp_port

ADMIN_GROUP, OPERATOR_GROUP, VIEWER_GROUP = "adm", "sys", "bin"  # groups every Debian host has
VIEWER_TOKEN = "viewer-token-" + "v" * 32
OPERATOR_TOKEN = "operator-token-" + "o" * 32
ADMIN_TOKEN = "admin-token-" + "a" * 32

# As another user: connect, send one request, print the status line and the error code, or "denied".
REQUEST = """
import json, socket, sys
path, method, route = sys.argv[1:4]
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(path)
except PermissionError:
    print("denied")
    sys.exit()
s.sendall(f"{method} {route} HTTP/1.0\\r\\nContent-Length: 2\\r\\n\\r\\n{{}}".encode())
answer = b""
while chunk := s.recv(65536):
    answer += chunk
head, _, body = answer.partition(b"\\r\\n\\r\\n")
error = json.loads(body).get("error", {}) if body.startswith(b"{") else {}
print(head.split(b" ")[1].decode(), error.get("code", ""), error.get("needed_role", ""))
"""


def as_user(*command: str, groups: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``command`` as the user nobody, with these supplementary groups and none other."""
    who = [
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        f"--groups={','.join(groups)}" if groups else "--clear-groups",
    ]
    return subprocess.run(
        [*who, *command], capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": "/nonexistent"}
    )


def request_as(path: Path, method: str, route: str, *groups: str) -> str:
    done = as_user("/usr/bin/python3", "-c", REQUEST, str(path), method, route, groups=groups)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def served(open_dir):
    """The control app on an admin, an operator and a viewer socket, in a loop of its own; yields the plan."""
    plan = [
        SocketListener(Role.ADMIN, open_dir / "control.sock", ADMIN_GROUP, 0o660, "daemon.socket_group"),
        SocketListener(Role.OPERATOR, open_dir / "control-operator.sock", OPERATOR_GROUP, 0o660, "operator"),
        SocketListener(Role.VIEWER, open_dir / "control-viewer.sock", VIEWER_GROUP, 0o660, "viewer"),
        TcpListener("127.0.0.1", free_tcp_port(), ((VIEWER_TOKEN, Role.VIEWER), (ADMIN_TOKEN, Role.ADMIN)), None),
    ]
    loop = asyncio.new_event_loop()
    runners = loop.run_until_complete(
        open_control(plan, lambda gate: create_control_app(None, None, None, None, gate), 0.1)
    )
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield plan

    async def cleanup():
        for runner in runners:
            await runner.cleanup()

    asyncio.run_coroutine_threadsafe(cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)
    loop.close()


def test_each_socket_lets_in_only_its_group_and_refuses_above_its_role(served, open_dir):
    admin, operator, viewer = (
        open_dir / name for name in ("control.sock", "control-operator.sock", "control-viewer.sock")
    )
    for path, group in ((admin, ADMIN_GROUP), (operator, OPERATOR_GROUP), (viewer, VIEWER_GROUP)):
        info = path.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, grp.getgrnam(group).gr_gid)
    everyone = [(admin, "POST", "/apply"), (operator, "POST", "/models/m/load"), (viewer, "GET", "/openapi.json")]
    assert [request_as(*call) for call in everyone] == ["denied"] * 3  # no group: no socket at all
    # A viewer: its socket reads, and refuses to load; the others do not even open.
    assert request_as(viewer, "GET", "/openapi.json", VIEWER_GROUP) == "200"
    assert request_as(viewer, "POST", "/models/m/load", VIEWER_GROUP) == "403 forbidden operator"
    assert request_as(viewer, "POST", "/apply", VIEWER_GROUP) == "403 forbidden admin"
    assert request_as(operator, "POST", "/models/m/load", VIEWER_GROUP) == "denied"
    assert request_as(admin, "POST", "/apply", VIEWER_GROUP) == "denied"
    # An operator: its socket lets load through to the handler (a bare app: 500), and refuses to apply.
    assert request_as(operator, "POST", "/apply", OPERATOR_GROUP) == "403 forbidden admin"
    assert request_as(operator, "GET", "/models/m/logs", OPERATOR_GROUP) == "403 forbidden admin"
    assert request_as(operator, "POST", "/rollback", OPERATOR_GROUP) == "403 forbidden admin"
    assert request_as(admin, "POST", "/apply", OPERATOR_GROUP) == "denied"
    # The admin group: through the gate to apply's handler, which finds the body wanting.
    assert request_as(admin, "POST", "/apply", ADMIN_GROUP) == "400 bad_request"


def test_the_cli_names_the_role_a_refusal_needs_and_where_to_get_it(served, open_dir):
    viewer = open_dir / "control-viewer.sock"
    done = as_user(
        executable("localllmctl"),
        "--socket",
        str(open_dir / "control.sock"),
        "--role",
        "viewer",
        "load",
        "m",
        "--json",
        groups=(VIEWER_GROUP,),
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        f"localllmctl: POST /models/{{name}}/load needs the operator role; this connection has viewer. The operator "
        f"role comes with the socket {open_dir}/control.sock (group {ADMIN_GROUP}), or the socket "
        f"{open_dir}/control-operator.sock (group {OPERATOR_GROUP}), or a token with role operator or admin on the "
        f"TCP control API (127.0.0.1:{served[-1].port})",
        f"localllmctl used {viewer} (the viewer socket); choose another with --role, --socket or --url",
    ]
    denied = as_user(
        executable("localllmctl"),
        "--socket",
        str(open_dir / "control.sock"),
        "apply",
        "/dev/null",
        groups=(VIEWER_GROUP,),
    )
    assert denied.returncode == 3, denied.stderr
    assert (
        f"you may not use the control socket {open_dir}/control.sock: it is mode 0660, group {ADMIN_GROUP}: "
        f"join that group (sudo usermod -a -G {ADMIN_GROUP} $USER"
    ) in denied.stderr


def test_a_viewer_token_may_read_and_not_apply(served):
    tcp = served[-1]
    url = f"http://127.0.0.1:{tcp.port}"
    assert (
        requests.get(f"{url}/openapi.json", headers={"Authorization": f"Bearer {VIEWER_TOKEN}"}, timeout=10).status_code
        == 200
    )
    refused = requests.post(f"{url}/apply", json={}, headers={"Authorization": f"Bearer {VIEWER_TOKEN}"}, timeout=10)
    assert refused.status_code == 403
    assert (refused.json()["error"]["code"], refused.json()["error"]["needed_role"]) == ("forbidden", "admin")
    assert "a token with role admin on the TCP control API" in refused.json()["error"]["message"]
    through = requests.post(f"{url}/apply", json={}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    assert through.status_code == 400


# -- a whole daemon with roles (needs the config and daemon wiring of issue 13) -------------------------------


def roles_config(daemon, open_dir: Path) -> Path:
    """The daemon's config, readable by nobody (it has to find the sockets in it)."""
    path = open_dir / "config.yaml"
    shutil.copy(daemon.config_path, path)
    path.chmod(0o644)
    return path


def test_a_daemon_gives_each_socket_and_token_its_role(start_daemon, open_dir, tmp_path, engine):
    port = free_tcp_port()
    daemon = start_daemon(
        [{"name": "tiny", "gguf": "tiny.gguf"}],
        state_dir=str(open_dir / "state"),
        socket_group=ADMIN_GROUP,
        role_sockets={"operator": {"group": OPERATOR_GROUP}, "viewer": {"group": VIEWER_GROUP}},
        control_listen=f"127.0.0.1:{port}",
        control_tokens=[{"token": VIEWER_TOKEN, "role": "viewer"}, {"token": OPERATOR_TOKEN, "role": "operator"}],
        control_token=ADMIN_TOKEN,
    )
    state = open_dir / "state"
    assert sorted(p.name for p in state.glob("*.sock")) == [
        "control-operator.sock",
        "control-viewer.sock",
        "control.sock",
    ]
    config = roles_config(daemon, open_dir)
    change = open_dir / "change.yaml"
    change.write_text(daemon.config_path.read_text().replace("context_size: 256", "context_size: 320"))
    change.chmod(0o644)

    def ctl(*args: str, groups: tuple[str, ...]) -> subprocess.CompletedProcess:
        return as_user(executable("localllmctl"), "--config", str(config), *args, groups=groups)

    # A viewer, with no flag but --config: the viewer socket is chosen, status works, load is refused.
    status = ctl("status", "--json", groups=(VIEWER_GROUP,))
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["daemon"]["instance"] == daemon.instance
    refused = ctl("load", "tiny", "--json", groups=(VIEWER_GROUP,))
    assert refused.returncode == 1 and "needs the operator role; this connection has viewer" in refused.stderr
    assert f"localllmctl used {state}/control-viewer.sock (the viewer socket)" in refused.stderr
    # An operator loads, and may not apply.
    loaded = ctl("load", "tiny", "--json", groups=(OPERATOR_GROUP,))
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout)["state"] == "ready"
    refused = ctl("apply", "--json", str(change), groups=(OPERATOR_GROUP,))
    assert (
        refused.returncode == 1 and "POST /apply needs the admin role; this connection has operator" in refused.stderr
    )
    # The admin group applies.
    applied = ctl("apply", "--json", str(change), groups=(ADMIN_GROUP,))
    assert applied.returncode == 0, applied.stderr
    assert json.loads(applied.stdout)["status"] == "good"
    # Over TCP, the token is the role.
    url = f"http://127.0.0.1:{port}"
    for token, code in ((VIEWER_TOKEN, 403), (OPERATOR_TOKEN, 403)):
        answer = requests.post(f"{url}/rollback", json={}, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert (answer.status_code, answer.json()["error"]["needed_role"]) == (code, "admin")
    unload = requests.post(
        f"{url}/models/tiny/unload", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"}, timeout=60
    )
    assert unload.status_code == 200 and unload.json()["state"] == "stopped"
    assert daemon.terminate() == 0
    assert list(state.glob("*.sock")) == []  # every socket is gone with the daemon


def test_tcp_control_off_loopback_needs_tls_and_serves_https_with_it(start_daemon, tmp_path):
    port = free_tcp_port()
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
            str(tmp_path / "key.pem"),
            "-out",
            str(tmp_path / "cert.pem"),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    bad = tmp_path / "off-loopback.yaml"
    bad.write_text(yaml.safe_dump({"daemon": {"control_listen": f"0.0.0.0:{port}", "control_token": ADMIN_TOKEN}}))
    done = subprocess.run([executable("localllmctl"), "config", "validate", str(bad)], capture_output=True, text=True)
    assert done.returncode == 2 and "is not a loopback address: it needs control_tls" in done.stderr
    daemon = start_daemon(
        [{"name": "tiny", "gguf": "tiny.gguf"}],
        control_listen=f"0.0.0.0:{port}",
        control_tokens=[{"token": VIEWER_TOKEN, "role": "viewer"}],
        control_tls={"cert": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")},
    )
    answer = requests.get(
        f"https://127.0.0.1:{port}/status",
        verify=str(tmp_path / "cert.pem"),
        headers={"Authorization": f"Bearer {VIEWER_TOKEN}"},
        timeout=30,
    )
    assert answer.status_code == 200 and answer.json()["daemon"]["instance"] == daemon.instance
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/status", headers={"Authorization": f"Bearer {VIEWER_TOKEN}"}, timeout=30)
    via_ctl = subprocess.run(
        [
            executable("localllmctl"),
            "--url",
            f"https://127.0.0.1:{port}",
            "--cacert",
            str(tmp_path / "cert.pem"),
            "status",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LOCALLLM_TOKEN": VIEWER_TOKEN},
    )
    assert via_ctl.returncode == 0, via_ctl.stderr
    assert json.loads(via_ctl.stdout)["daemon"]["instance"] == daemon.instance
