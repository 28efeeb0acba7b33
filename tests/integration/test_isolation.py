"""Model servers are reachable only through localllm, on the real engine.

A llama.cpp server listens on a UNIX socket in a directory only its user may
enter, under a directory only the daemon may enter, and its container has no
network: another local user (``nobody`` here) cannot connect to it, and there
is no port to squat. Ollama's server (the STAND-IN here) must use a loopback
port: a program that takes that port first makes the start fail, and gets no
request, not even a health probe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import requests

from supervisor.upstream import servers_dir

from .conftest import our_containers, poll_for
from .ollama_standin import ensure_standin_image

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
REGISTRY = {"tiny-a:1b": {"size": 200_000_000, "parameter_size": "1.1B", "quantization_level": "Q4_0"}}

CONNECT = """
import socket, sys
kind, where = sys.argv[1], sys.argv[2]
family = socket.AF_UNIX if kind == "unix" else socket.AF_INET
address = where if kind == "unix" else ("127.0.0.1", int(where))
with socket.socket(family) as s:
    s.settimeout(5)
    try:
        s.connect(address)
        s.sendall(b"GET /health HTTP/1.0\\r\\n\\r\\n")
        print("connected", s.recv(100))
    except OSError as exc:
        print("refused", type(exc).__name__, exc.errno)
"""

# Answers 200 to everything and prints each request line: the impersonator of the issue.
SQUATTER = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Answer(BaseHTTPRequestHandler):
    def do_GET(self):
        print("request", self.requestline, flush=True)
        body = b'{"version":"0.0.0"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_POST = do_GET
    def log_message(self, *args):
        pass

server = HTTPServer(("127.0.0.1", int(sys.argv[1])), Answer)
print("listening", flush=True)
server.serve_forever()
"""


def as_nobody(script: str, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([*NOBODY, sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True,
                            **popen)


def test_a_llamacpp_server_has_no_network_and_nobody_else_can_reach_its_socket(start_daemon, engine):
    daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf", "preload": True}])
    assert daemon.model("tiny")["state"] == "ready"
    [container] = our_containers(engine, daemon.instance)
    inspected = engine.api.inspect_container(container.id)
    assert inspected["HostConfig"]["NetworkMode"] == "none"
    assert not inspected["NetworkSettings"]["Ports"]
    servers = servers_dir(Path(daemon.config["daemon"]["state_dir"]))
    [socket_dir] = list(servers.iterdir())
    socket_path = socket_dir / "llama.sock"
    assert socket_path.is_socket()
    assert (servers.stat().st_mode & 0o777, socket_dir.stat().st_mode & 0o777) == (0o700, 0o700)

    with tempfile.TemporaryDirectory(prefix="llt") as short:  # sun_path's 108 bytes: a short name for the socket
        os.chmod(short, 0o755)
        (Path(short) / "s").symlink_to(socket_path)
        as_root = subprocess.run([sys.executable, "-c", CONNECT, "unix", f"{short}/s"], capture_output=True,
                                 text=True, timeout=30)
        out, _ = as_nobody(CONNECT, "unix", f"{short}/s").communicate(timeout=30)
    assert as_root.stdout.startswith("connected"), as_root.stdout + as_root.stderr  # the path itself works
    assert out.startswith("refused PermissionError"), out
    assert daemon.chat("tiny").status_code == 200  # the daemon itself reaches it


def test_a_program_squatting_the_ollama_port_makes_the_start_fail_and_gets_no_request(start_daemon, engine,
                                                                                      tmp_path):
    # The stand-in waits before it binds, as a slow server would: the window a squatter needs.
    section = {"image": ensure_standin_image(engine), "models_dir": str(tmp_path / "store"), "startup_timeout": 20,
               "env": {"STANDIN_REGISTRY": json.dumps(REGISTRY), "STANDIN_PULL_SECONDS": "0.1",
                       "STANDIN_BIND_DELAY": "3"}}
    daemon = start_daemon([{"name": "chat-a", "backend": "ollama", "tag": "tiny-a:1b", "pull": True}],
                          top={"ollama": section})
    answers: list[requests.Response] = []
    asking = threading.Thread(target=lambda: answers.append(daemon.chat("chat-a")))
    asking.start()
    server = poll_for(lambda: next(iter(our_containers(engine, daemon.instance)), None), 20, "the Ollama server")
    port = server.labels["io.localllm.endpoint"].removeprefix("tcp:")
    squatter = as_nobody(SQUATTER, port, stderr=subprocess.STDOUT)
    try:
        assert squatter.stdout.readline().strip() == "listening"
        asking.join(timeout=60)
        [answer] = answers
        assert answer.status_code == 503, answer.text
        model = daemon.model("chat-a")
        assert model["state"] in ("failed", "stopped") or model["failures"] >= 1
        assert f"port {port} is held by another program" in daemon.log()
    finally:
        squatter.terminate()
        heard, _ = squatter.communicate(timeout=10)
    assert "request" not in heard, heard  # not even a health probe reached it
