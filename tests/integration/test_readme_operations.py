"""Every command in the README's Operations section, run in order against a real daemon.

The README's paths and addresses are the installed ones; the test points them at its own
daemon. ``install.sh`` runs in a throwaway container in test_install.py, so here it is only
checked that that test runs it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLLOWING = re.compile(r"(^| )(-f|--follow)( |$)")


def operations_commands() -> list[str]:
    """The ``$ `` lines of the console blocks in the README's '## Operations' section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Operations\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```console\n(.*?)```", section, re.S)
    return [line[2:] for block in blocks for line in block.splitlines() if line.startswith("$ ")]


def test_the_readme_shows_every_kind_of_operation():
    programs = {" ".join(c.split()[:2]) for c in operations_commands()}
    assert {
        "localllmctl status",
        "localllmctl apply",
        "localllmctl rollback",
        "localllmctl logs",
        "localllmctl history",
        "localllmctl load",
        "localllmctl unload",
        "localllmctl events",
        "sudo bash",
    } <= programs, programs


def test_every_operations_command_works(start_daemon, tmp_path):
    daemon = start_daemon(
        [{"name": "llama3", "gguf": "tiny.gguf", "preload": True}, {"name": "qwen", "gguf": "tiny2.gguf"}]
    )
    proxy = daemon.proxy_url.removeprefix("http://").removesuffix("/v1")
    replacements = {
        "/etc/localllm/config.yaml": str(daemon.config_path),
        "/var/lib/localllm/control.sock": str(daemon.socket),
        "127.0.0.1:8081": proxy,
        "io.localllm.owner=localllmd": f"io.localllm.owner={daemon.instance}",
    }
    env = {
        **os.environ,
        "LOCALLLM_SOCKET": str(daemon.socket),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    ran = []
    for command in operations_commands():
        if command.startswith("sudo bash install.sh"):
            assert "install.sh" in (ROOT / "tests/integration/test_install.py").read_text()
            continue
        for old, new in replacements.items():
            command = command.replace(old, new)
        if FOLLOWING.search(command):
            output = run_for_a_while(command, env)
            assert output.strip(), f"{command}: printed nothing while following"
        else:
            done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=120)
            assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
            output = done.stdout
            check_output(command, output)
        ran.append(command)
    assert len(ran) >= 20, ran
    assert daemon.model("qwen")["state"] == "ready"  # the troubleshooting section loads it again


def run_for_a_while(command: str, env: dict, seconds: float = 2.0) -> str:
    """A following command: let it print for a while, then stop it as Ctrl-C would."""
    with subprocess.Popen(
        ["bash", "-c", f"exec {command}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        time.sleep(seconds)
        assert process.poll() is None, f"{command}: ended early with {process.returncode}: {process.stderr.read()}"
        process.send_signal(2)  # SIGINT
        out, _ = process.communicate(timeout=10)
    return out


def check_output(command: str, output: str) -> None:
    if command.endswith("status --json"):
        assert {m["name"] for m in json.loads(output)["models"]} == {"llama3", "qwen"}
    elif command.endswith("status --check"):
        assert output == "ok\n"
    elif "/health" in command:
        assert json.loads(output)["status"] == "ok"
    elif command.endswith("/metrics"):
        assert 'localllm_model_state{model="llama3",state="ready"} 1.0' in output
    elif command.startswith("localllmctl load"):
        assert " is ready on its socket " in output
    elif command.startswith("localllmctl unload"):
        assert output.endswith(" is stopped\n")
    elif command.startswith("localllmctl rollback"):
        assert output.splitlines()[-1].endswith(": good")
