"""Model servers are reachable only through localllm, on the real engine, for both ways of hosting.

A llama.cpp server listens on a UNIX socket and its container has no network. The Ollama server
(the STAND-IN here) listens on loopback inside a network namespace of its own, reached through
the relay on a UNIX socket. Either socket lies in a directory only the server's user may enter,
under a directory only the daemon may enter: another local user (``nobody`` here) cannot connect
to any model server, and no server has a port on the host to take or to reach.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from supervisor.core.backends import ollama_relay
from supervisor.core.containers import SOCKET_NAME, servers_dir

from .conftest import our_containers
from .ollama_standin import ensure_standin_image

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
REGISTRY = {"tiny-a:1b": {"size": 200_000_000, "parameter_size": "1.1B", "quantization_level": "Q4_0"}}

CONNECT = """
import socket, sys
kind, where = sys.argv[1], sys.argv[2]
family = socket.AF_UNIX if kind == "unix" else socket.AF_INET
address = where if kind == "unix" else (where, int(sys.argv[3]))
with socket.socket(family) as s:
    s.settimeout(5)
    try:
        s.connect(address)
        s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        print("connected", s.recv(100))
    except OSError as exc:
        print("refused", type(exc).__name__, exc.errno)
"""


def connect(*args: str, as_nobody: bool) -> str:
    done = subprocess.run(
        [*(NOBODY if as_nobody else []), sys.executable, "-c", CONNECT, *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.stdout + done.stderr


@pytest.fixture(params=["llamacpp", "ollama"])
def hosted(request, start_daemon, engine, tmp_path):
    """A daemon serving one ready model of the given kind: (daemon, model name, the server's container)."""
    if request.param == "llamacpp":
        daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf", "preload": True}])
        name = "tiny"
    else:
        section = {
            "image": ensure_standin_image(engine),
            "models_dir": str(tmp_path / "store"),
            "startup_timeout": 30,
            "env": {"STANDIN_REGISTRY": json.dumps(REGISTRY), "STANDIN_PULL_SECONDS": "0.1"},
        }
        daemon = start_daemon(
            [{"name": "chat-a", "backend": "ollama", "tag": "tiny-a:1b", "pull": True, "preload": True}],
            top={"ollama": section},
        )
        name = "chat-a"
    assert daemon.model(name)["state"] == "ready", daemon.model(name)["error"]
    [container] = our_containers(engine, daemon.instance)
    return daemon, name, engine.api.inspect_container(container.id)


def test_no_other_local_user_can_reach_a_model_server(hosted):
    daemon, name, inspected = hosted
    assert not any((inspected["NetworkSettings"]["Ports"] or {}).values())  # no port published on the host
    servers = servers_dir(Path(daemon.config["daemon"]["state_dir"]))
    [socket_dir] = list(servers.iterdir())
    socket_path = socket_dir / SOCKET_NAME
    assert socket_path.is_socket()
    assert (servers.stat().st_mode & 0o777, socket_dir.stat().st_mode & 0o777) == (0o700, 0o700)

    with tempfile.TemporaryDirectory(prefix="llt") as short:  # sun_path's 108 bytes: a short name for the socket
        os.chmod(short, 0o755)
        (Path(short) / "s").symlink_to(socket_path)
        as_root = connect("unix", f"{short}/s", as_nobody=False)
        as_nobody = connect("unix", f"{short}/s", as_nobody=True)
    assert as_root.startswith("connected b'HTTP/1."), as_root  # the path itself works, for the daemon's user
    assert as_nobody.startswith("refused PermissionError"), as_nobody

    # No address of the server's: llama.cpp has no network; Ollama listens on loopback in a namespace of its own.
    addresses = [n["IPAddress"] for n in inspected["NetworkSettings"]["Networks"].values() if n.get("IPAddress")]
    assert inspected["HostConfig"]["NetworkMode"] == ("none" if name == "tiny" else f"localllm-{daemon.instance}")
    assert bool(addresses) == (name == "chat-a")
    for address in addresses:
        tried = connect("tcp", address, str(ollama_relay.SERVER_PORT), as_nobody=True)
        assert tried.startswith("refused ConnectionRefusedError"), tried
    assert daemon.chat(name).status_code == 200  # the daemon itself reaches it
