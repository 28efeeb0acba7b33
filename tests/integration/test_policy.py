"""daemon.policy on the real engine: an apply that asks for more than the running policy allows is refused with
400 naming the field and the rule, no container is touched, and only a restart changes the policy."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import executable, our_containers

FOREIGN_IMAGE = "alpine:3"  # any image the policy does not list; refused before Docker is asked about it


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=60)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.socket_path)


def post_apply(daemon, path: str) -> tuple[int, dict]:
    """POST /apply as any control client would: the HTTP status and the answer."""
    body = json.dumps({"config": Path(path).read_text(), "source": path})
    connection = UnixConnection(str(daemon.socket))
    try:
        connection.request("POST", "/apply", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def ctl(daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [executable("localllmctl"), "--socket", str(daemon.socket), *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def policed(start_daemon, models_dir, tmp_path):
    """A daemon whose policy keeps model files under its own root, with one model running."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(models_dir / "tiny.gguf", root / "tiny.gguf")
    (root / "shadow.gguf").symlink_to("/etc/shadow")
    daemon = start_daemon(
        [{"name": "tiny", "gguf": str(root / "tiny.gguf"), "preload": True}], policy={"models_root": str(root)}
    )
    assert daemon.model("tiny")["state"] == "ready"
    return daemon, root


def variant(daemon, tmp_path, name: str, change) -> str:
    config = yaml.safe_load(daemon.config_path.read_text())
    change(config)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def tiny(config: dict) -> dict:
    return config["models"][0]


BREACHES = {
    "ollama-store-at-root": (
        lambda c: c.setdefault("ollama", {}).update(models_dir="/"),
        "ollama.models_dir: / is outside daemon.policy.models_root",
    ),
    "gguf-etc-shadow": (
        lambda c: tiny(c).update(gguf="/etc/shadow"),
        "models[0].gguf: /etc/shadow is outside daemon.policy.models_root",
    ),
    "gguf-symlink-to-etc-shadow": (
        lambda c: tiny(c).update(gguf=tiny(c)["gguf"].replace("tiny", "shadow")),
        "(which resolves to /etc/shadow) is outside daemon.policy.models_root",
    ),
    "foreign-image": (
        lambda c: tiny(c).update(image=FOREIGN_IMAGE),
        f"models[0].image: image '{FOREIGN_IMAGE}' is not in daemon.policy.allowed_images",
    ),
    "extra-args-host": (
        lambda c: tiny(c).update(extra_args=["--host", "0.0.0.0"]),
        "models[0].extra_args: '--host' is set by localllm",
    ),
    "extra-args-api-key": (
        lambda c: tiny(c).update(extra_args=["--api-key", "x"]),
        "models[0].extra_args[0]: '--api-key' is never allowed",
    ),
    "extra-args-not-allowed": (
        lambda c: tiny(c).update(extra_args=["--chat-template-file", "/etc/passwd"]),
        "models[0].extra_args[0]: '--chat-template-file' is not in daemon.policy.allowed_extra_args",
    ),
    "ollama-env-ld-preload": (
        lambda c: c.setdefault("ollama", {}).update(env={"LD_PRELOAD": "/tmp/x.so"}),
        "ollama.env.LD_PRELOAD: LD_PRELOAD is never allowed",
    ),
    "ollama-env-not-allowed": (
        lambda c: c.setdefault("ollama", {}).update(env={"OLLAMA_ORIGINS": "*"}),
        "ollama.env.OLLAMA_ORIGINS: OLLAMA_ORIGINS is not in daemon.policy.allowed_ollama_env",
    ),
}


def test_an_apply_beyond_the_policy_is_refused_with_400_and_touches_no_container(policed, engine, tmp_path):
    daemon, _ = policed
    before = sorted(c.id for c in our_containers(engine, daemon.instance))
    for name, (change, fragment) in BREACHES.items():
        path = variant(daemon, tmp_path, name, change)
        done = ctl(daemon, "apply", path)
        assert done.returncode == 2 and fragment in done.stderr, (name, done.stderr)
        assert f"{path}:" in done.stderr, (name, done.stderr)  # FILE:LINE: field: reason
        status, answer = post_apply(daemon, path)
        assert status == 400 and answer["error"]["code"] == "invalid_config", (name, status, answer)
        assert fragment in answer["error"]["message"], (name, answer)
        assert sorted(c.id for c in our_containers(engine, daemon.instance)) == before, name
    generations = json.loads(ctl(daemon, "history", "--json").stdout)
    assert [g["status"] for g in generations[1:]] == ["invalid"] * 2 * len(BREACHES)
    assert daemon.model("tiny")["state"] == "ready" and daemon.chat("tiny").status_code == 200


def test_the_policy_changes_only_with_a_restart(policed, engine, tmp_path):
    daemon, _ = policed
    before = sorted(c.id for c in our_containers(engine, daemon.instance))
    for name, policy in [("looser", {"models_root": "/"}), ("dropped", None)]:
        path = variant(daemon, tmp_path, name, lambda c, policy=policy: c["daemon"].update(policy=policy))
        done = ctl(daemon, "apply", path)
        assert done.returncode == 2 and "changes daemon.policy, which only a restart" in done.stderr, done.stderr
        status, answer = post_apply(daemon, path)
        assert status == 409 and answer["error"]["code"] == "apply_refused", answer
    # Loosening the policy and using it at once is refused for what it uses, under the running policy.
    path = variant(
        daemon,
        tmp_path,
        "loosened-and-used",
        lambda c: (c["daemon"].update(policy={"models_root": "/"}), tiny(c).update(gguf="/etc/shadow")),
    )
    done = ctl(daemon, "apply", path)
    assert done.returncode == 2 and "models[0].gguf: /etc/shadow is outside" in done.stderr, done.stderr
    assert sorted(c.id for c in our_containers(engine, daemon.instance)) == before


def test_an_apply_within_the_policy_goes_through(policed, engine, tmp_path):
    daemon, _ = policed
    [old] = our_containers(engine, daemon.instance)
    path = variant(daemon, tmp_path, "threads", lambda c: tiny(c).update(extra_args=["--threads", "1"]))
    done = ctl(daemon, "apply", path)
    assert done.returncode == 0 and ": good" in done.stdout, done.stderr
    assert not old.id.startswith(daemon.model("tiny")["container"])  # the new version serves
    assert daemon.chat("tiny").status_code == 200


def test_a_model_file_swapped_for_a_symlink_after_the_apply_is_refused_at_its_start(policed, engine, tmp_path):
    # The realpath is checked when the config is applied; a model started hours later is checked again.
    daemon, root = policed
    assert ctl(daemon, "unload", "tiny").returncode == 0
    (root / "tiny.gguf").unlink()
    (root / "tiny.gguf").symlink_to("/etc/shadow")
    answer = daemon.chat("tiny")
    assert answer.status_code == 503
    error = daemon.model("tiny")["error"]  # the client gets an error id; the operator the reason
    assert "refused by the policy" in error
    assert "(which resolves to /etc/shadow) is outside daemon.policy.models_root" in error
    assert [c for c in our_containers(engine, daemon.instance) if c.labels["io.localllm.model"] == "tiny"] == []
