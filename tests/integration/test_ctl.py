"""Every localllmctl command, run as an operator would, against a running daemon on the real engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest
import requests
import yaml

from .conftest import assert_invariants, executable, long_stream, poll_for

TWO = [{"name": "tiny", "gguf": "tiny.gguf", "aliases": ["small"]}, {"name": "tiny2", "gguf": "tiny2.gguf"}]


def ctl(daemon, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [executable("localllmctl"), "--socket", str(daemon.socket), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    return done.stdout


def test_status_and_ps_show_the_models_as_a_table_and_as_json(start_daemon):
    daemon = start_daemon(TWO)
    table = ok(ctl(daemon, "status"))
    assert table.splitlines()[3].split()[:3] == ["MODEL", "STATE", "DEVICE"]
    assert [line.split()[:2] for line in table.splitlines()[5:7]] == [["tiny", "stopped"], ["tiny2", "stopped"]]
    assert ok(ctl(daemon, "ps")).splitlines()[3:] == table.splitlines()[3:]
    status = json.loads(ok(ctl(daemon, "status", "--json")))
    assert [m["name"] for m in status["models"]] == ["tiny", "tiny2"]
    assert status["daemon"]["instance"] == daemon.instance


def test_load_shows_progress_then_unload_stops_it(start_daemon, engine):
    daemon = start_daemon(TWO)
    done = ctl(daemon, "load", "small")  # an alias
    out = ok(done)
    assert out.startswith("tiny is ready on its socket ")
    progress = [line.split()[1:3] for line in done.stderr.splitlines()]
    assert ["state", "tiny"] in progress and ["load", "tiny"] in progress, done.stderr
    assert daemon.model("tiny")["state"] == "ready"
    assert_invariants(daemon, engine)

    loaded = json.loads(ok(ctl(daemon, "load", "tiny", "--json")))  # already ready: at once
    assert loaded["state"] == "ready" and loaded["container"] == daemon.model("tiny")["container"]

    unloaded = ok(ctl(daemon, "unload", "tiny"))
    assert unloaded.strip() == "tiny is stopped"
    assert daemon.model("tiny")["container"] is None
    assert_invariants(daemon, engine)
    assert ok(ctl(daemon, "unload", "tiny")).strip() == "tiny is stopped"  # idempotent


def test_load_and_unload_errors_have_distinct_exit_codes(start_daemon, models_dir):
    daemon = start_daemon([*TWO, {"name": "broken", "gguf": "broken.gguf"}], restart={"max_failures": 1, "delay": 0.1})
    unknown = ctl(daemon, "load", "nope")
    assert unknown.returncode == 2 and "unknown model 'nope'" in unknown.stderr.lower() or "nope" in unknown.stderr
    failed = ctl(daemon, "load", "broken")
    assert failed.returncode == 1 and "broken" in failed.stderr, failed.stderr
    assert daemon.model("broken")["state"] == "failed"
    check = ctl(daemon, "status", "--check")
    assert check.returncode == 1 and check.stdout.startswith("unhealthy\n  model broken failed"), check.stdout
    ok(ctl(daemon, "unload", "broken"))  # clears a failed model
    assert daemon.model("broken")["state"] == "stopped"
    assert ok(ctl(daemon, "status", "--check")) == "ok\n"


def test_unload_is_refused_while_the_model_serves(start_daemon, engine):
    daemon = start_daemon([{"name": "slow", "gguf": "slow.gguf", "preload": True, "context_size": 2048}])
    body = long_stream("slow", 600)
    streaming = threading.Event()

    def stream():
        with requests.post(f"{daemon.proxy_url}/chat/completions", json=body, stream=True, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith(b"data: "):
                    streaming.set()

    client = threading.Thread(target=stream, daemon=True)
    client.start()
    assert streaming.wait(30)
    busy = ctl(daemon, "unload", "slow")
    assert busy.returncode == 1, busy.stderr
    assert "in flight" in busy.stderr and "unload it when they are done" in busy.stderr
    assert daemon.model("slow")["state"] == "ready"
    client.join(120)
    ok(ctl(daemon, "unload", "slow"))
    assert_invariants(daemon, engine)


def test_logs_tail_and_follow(start_daemon):
    daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf", "preload": True}])
    tail = ok(ctl(daemon, "logs", "tiny", "--tail", "5"))
    assert len(tail.splitlines()) == 5
    whole = ok(ctl(daemon, "logs", "tiny", "--tail", "100000"))
    assert "server is listening on" in whole or "HTTP server listening" in whole or "listening" in whole
    with subprocess.Popen(
        [executable("localllmctl"), "--socket", str(daemon.socket), "logs", "-f", "tiny", "--tail", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as follower:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(follower.stdout.readline, "")), daemon=True)
        reader.start()
        poll_for(lambda: lines, 20, "the last line so far: the engine's log stream is open")
        assert daemon.chat("tiny").status_code == 200  # llama-server logs each request
        poll_for(lambda: any("completion" in line or "slot" in line for line in lines[1:]), 20, "followed log lines")
        follower.terminate()
        reader.join(10)  # it reads to the end before the pipe closes
    unknown = ctl(daemon, "logs", "tiny2")
    assert unknown.returncode == 2 and "tiny2" in unknown.stderr  # not in this catalog: bad input
    ok(ctl(daemon, "unload", "tiny"))
    stopped = ctl(daemon, "logs", "tiny")
    assert stopped.returncode == 1 and "'tiny' has no container (stopped)" in stopped.stderr, stopped.stderr


def test_events_list_and_follow(start_daemon):
    daemon = start_daemon(TWO)
    seen: list[dict] = []
    notices: list[str] = []
    with subprocess.Popen(
        [executable("localllmctl"), "--socket", str(daemon.socket), "events", "-f", "--json", "--limit", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as follower:
        reader = threading.Thread(
            target=lambda: seen.extend(json.loads(line) for line in iter(follower.stdout.readline, "")), daemon=True
        )
        reader.start()
        threading.Thread(target=lambda: notices.extend(iter(follower.stderr.readline, "")), daemon=True).start()
        poll_for(
            lambda: f"following localllmd's events on {daemon.socket} (Ctrl-C to stop)\n" in notices,
            20,
            "the subscription",
        )  # said once the daemon has subscribed it: no later event can be missed
        ok(ctl(daemon, "load", "tiny", "--json"))
        ok(ctl(daemon, "load", "tiny2", "--json"))
        poll_for(lambda: [e for e in seen if e["kind"] == "load" and e["model"] == "tiny2"], 20, "tiny2's load event")
        follower.terminate()
        reader.join(10)
    kinds = [(e["kind"], e["model"], e["data"].get("to")) for e in seen]
    assert kinds[:3] == [("state", "tiny", "starting"), ("load", "tiny", None), ("state", "tiny", "ready")] or kinds[
        :3
    ] == [("state", "tiny", "starting"), ("state", "tiny", "ready"), ("load", "tiny", None)], kinds
    ids = [e["id"] for e in seen]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    listed = ok(ctl(daemon, "events", "--model", "tiny2"))
    assert listed and all(" tiny2 " in f" {line} " for line in listed.splitlines()), listed
    recent = json.loads("[" + ",".join(ok(ctl(daemon, "events", "--json", "-n", "2")).splitlines()) + "]")
    assert [e["id"] for e in recent] == ids[-2:] or len(recent) == 2


def test_apply_shows_the_diff_and_progress_then_history_and_rollback(start_daemon, tmp_path, engine):
    daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf", "preload": True}])
    config = yaml.safe_load(daemon.config_path.read_text())
    config["models"][0]["context_size"] = 320
    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump(config))
    done = ctl(daemon, "apply", str(new))
    ok(done)
    assert "-- context_size: 256" in done.stderr and "+- context_size: 320" in done.stderr, done.stderr
    assert "apply" in done.stderr and "new version passed its health gate" in done.stderr, done.stderr
    assert done.stdout.splitlines() == ["  replace  tiny", f"generation 2 ({new}): good"]

    table = ok(ctl(daemon, "history"))
    assert [line.split()[:2] for line in table.splitlines()[2:]] == [["1", "good"], ["2", "good"]]
    assert "*active" in table.splitlines()[-1]
    rolled = ok(ctl(daemon, "rollback"))
    assert rolled.splitlines()[-1] == "generation 3 (rollback to generation 1): good"
    history = json.loads(ok(ctl(daemon, "history", "--json")))
    assert [g["status"] for g in history] == ["good", "good", "good"]
    assert_invariants(daemon, engine)

    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [")
    refused = ctl(daemon, "apply", str(bad))
    assert refused.returncode == 2 and "invalid config" in refused.stderr


def test_config_validate_init_and_profiles(tmp_path):
    def run(*args):
        return subprocess.run([executable("localllmctl"), *args], capture_output=True, text=True, timeout=60)

    target = tmp_path / "etc" / "config.yaml"
    written = ok(run("config", "init", "--output", str(target), "--state-dir", str(tmp_path / "state")))
    assert written.startswith(f"wrote {target} (profile cpu-only: detected no GPU")
    text = target.read_text()
    assert "profile: cpu-only  # detected no GPU" in text
    assert ok(run("config", "validate", str(target))) == f"{target}: valid (0 models, profile cpu-only)\n"
    again = run("config", "init", "--output", str(target))
    assert again.returncode == 2 and "exists; keeping it" in again.stderr
    assert target.read_text() == text
    assert run("config", "init", "--profile", "nope").returncode == 2

    listed = ok(run("profiles", "list"))
    rows = [line.split()[0] for line in listed.splitlines()[2:]]
    assert rows == ["cpu-only", "gpu-1x24g", "gpu-1x80g", "gpu-1x8g", "gpu-2x24g"]
    assert "cpu-only (detected)" in listed
    as_json = json.loads(ok(run("profiles", "list", "--json")))
    assert as_json["detected"] == "cpu-only" and len(as_json["profiles"]) == 5
    shown = yaml.safe_load(ok(run("profiles", "show", "gpu-2x24g")))
    assert [g["vram_gib"] for g in shown["hardware"]["gpus"]] == [24, 24]
    assert run("profiles", "show", "nope").returncode == 2
    detected = json.loads(ok(run("profiles", "detect", "--json")))
    assert detected["profile"] == "cpu-only" and detected["host"]["gpu_vram_gib"] == []
    assert ok(run("profiles", "detect")).splitlines()[1] == "profile: cpu-only"


def test_estimate_and_librechat_from_the_daemons_config(start_daemon):
    daemon = start_daemon(TWO, api_keys=["sk-local-0123456789abcdef0123456789abcdef"])
    estimate = json.loads(ok(ctl(daemon, "--config", str(daemon.config_path), "estimate", "small", "--json")))
    assert estimate["model"] == "tiny" and estimate["total"] > estimate["weights"] > 0
    block = yaml.safe_load(ok(ctl(daemon, "--config", str(daemon.config_path), "librechat")))
    endpoint = block["endpoints"]["custom"][0]
    assert endpoint["apiKey"] == "sk-local-0123456789abcdef0123456789abcdef" and endpoint["models"]["fetch"] is True


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_and_model_names(start_daemon, shell, tmp_path):
    script = ok(subprocess.run([executable("localllmctl"), "completion", shell], capture_output=True, text=True))
    assert "localllmctl" in script and "_ARGCOMPLETE" in script
    if shell != "bash":
        return
    daemon = start_daemon(TWO)
    out = tmp_path / "completions"

    def complete(line: str) -> list[str]:
        env = {
            **os.environ,
            "_ARGCOMPLETE": "1",
            "_ARGCOMPLETE_IFS": "\n",
            "COMP_LINE": line,
            "COMP_POINT": str(len(line)),
            "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
        }
        subprocess.run([executable("localllmctl")], env=env, capture_output=True, timeout=30)
        return out.read_text().split("\n")

    assert {"load", "unload", "logs", "events", "status"} <= set(complete("localllmctl "))
    assert complete(f"localllmctl --socket {daemon.socket} load ti") == ["tiny", "tiny2"]


def test_status_check_against_a_stopped_daemon_exits_1_within_its_deadline(start_daemon):
    """A daemon whose event loop does not run (SIGSTOP here; a wedged loop alike) still has its connections taken
    by the kernel: only the deadline can tell."""
    daemon = start_daemon(TWO)
    assert ok(ctl(daemon, "status", "--check")) == "ok\n"
    os.kill(daemon.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        check = ctl(daemon, "status", "--check", timeout=30)
        took = time.monotonic() - started
        started = time.monotonic()
        status = ctl(daemon, "status", "--timeout", "2", timeout=30)
        took_status = time.monotonic() - started
    finally:
        os.kill(daemon.process.pid, signal.SIGCONT)
    print(
        f"status --check against the stopped daemon: exit {check.returncode} after {took:.2f}s; "
        f"status --timeout 2: exit {status.returncode} after {took_status:.2f}s"
    )
    assert check.returncode == 1 and 5 <= took < 7, (check, took)
    assert check.stdout == (
        f"unresponsive\n  localllmd on {daemon.socket} did not answer GET /health within 5s "
        "(--timeout): it is stopped, stuck or overloaded; its log may say why "
        "(journalctl -u localllm)\n"
    )
    assert status.returncode == 3 and 2 <= took_status < 4, (status, took_status)
    assert f"localllmd on {daemon.socket} did not answer GET /status within 2s (--timeout)" in status.stderr
    assert ok(ctl(daemon, "status", "--check")) == "ok\n"  # running again, it answers again


def test_unreachable_daemon_exits_3_and_check_exits_1(tmp_path):
    base = [executable("localllmctl"), "--socket", str(tmp_path / "none.sock")]
    status = subprocess.run([*base, "status"], capture_output=True, text=True)
    assert status.returncode == 3 and "not reachable" in status.stderr
    check = subprocess.run([*base, "status", "--check"], capture_output=True, text=True)
    assert check.returncode == 1 and check.stdout.startswith("unreachable\n")
