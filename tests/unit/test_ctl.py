"""supervisor.cli.ctl: `localllmctl config validate` and `model generate` as run by an operator; status rendering."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from supervisor.cli.render import format_age, render_status

from .config_cases import BAD_CONFIGS, find_problem
from .conftest import LOCALLLMCTL


def localllmctl(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([LOCALLLMCTL, *map(str, args)], capture_output=True, text=True, timeout=60, cwd=cwd)


@pytest.mark.parametrize("text, expected", BAD_CONFIGS)
def test_config_validate_rejects_bad_file_with_status_2(config_file, text, expected):
    path = config_file(text)
    done = localllmctl("config", "validate", path)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0] == f"localllmctl: invalid config {path}:"
    for line, fragment in expected:
        assert find_problem(lines[1:], path, line, fragment), f"no '{fragment}' at line {line} in:\n{done.stderr}"
    assert len(lines) == 1 + len(expected), done.stderr


def test_config_validate_accepts_good_file(config_file):
    path = config_file("""\
        profile: cpu-only
        daemon:
          proxy_listen: 127.0.0.1:8081
          port_range: 28100-28199
        models:
          - name: a
            aliases: [gpt-4o]
            gguf: m.gguf
            ttl: 5m
          - name: b
            gguf: m.gguf
        """)
    done = localllmctl("config", "validate", path)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == f"{path}: valid (2 models, profile cpu-only)\n"


def test_no_command_prints_help_and_exits_2():
    done = localllmctl()
    assert done.returncode == 2
    assert "usage: localllmctl" in done.stderr


def test_model_generate_writes_the_file(tmp_path):
    path = tmp_path / "tiny.gguf"
    done = localllmctl("model", "generate", path, "--blocks", "1", "--embedding", "32")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == f"wrote {path} ({path.stat().st_size} bytes)\n"
    assert path.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--embedding", "66"], "localllmctl: model generate: embedding must divide by heads, and heads by kv_heads\n"),
        (["--blocks", "-1"], None),
    ],
    ids=["embedding-66", "blocks-minus-1"],
)
def test_model_generate_rejects_bad_shapes_with_status_2(tmp_path, args, message):
    path = tmp_path / "bad.gguf"
    done = localllmctl("model", "generate", path, *args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    if message:
        assert done.stderr == message
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- rendering ---------------------------------------------------------------

DAEMON = {
    "version": "0.1.0",
    "pid": 4242,
    "instance": "localllmd",
    "profile": "cpu-only",
    "profile_reason": "named in the config: 'cpu-only'",
    "docker_version": "27.3.1",
    "proxy": ["http://127.0.0.1:8081/v1", "http://[::1]:8081/v1"],
    "started_at": 0.0,
    "uptime_seconds": 7384.2,
}


def model(name, **changes):
    row = {
        "name": name,
        "aliases": [],
        "backend": "llamacpp",
        "state": "stopped",
        "container": None,
        "port": None,
        "preload": False,
        "pinned": False,
        "in_flight": 0,
        "last_used": None,
        "ready_at": None,
        "load_seconds": None,
        "error": None,
        "device": None,
        "waiting": 0,
        "memory": {"need": 1536 * 1024, "estimate": None, "learned": None, "measured": None},
    }
    return {**row, **changes}


def test_render_status_table_and_errors():
    status = {
        "daemon": DAEMON,
        "models": [
            model(
                "qwen2.5-7b",
                state="ready",
                endpoint="unix:0123456789abcdef",
                container="3f2a9c1b7d4e",
                in_flight=2,
                preload=True,
                pinned=True,
                device="gpu0",
                waiting=3,
                memory={"need": 5_500 * 2**20, "measured": 5_200 * 2**20},
            ),
            model("tiny"),
            model("broken", state="failed", error="model 'broken' failed to start: exited (exit code 1)"),
        ],
    }
    lines = render_status(status).splitlines()
    assert lines[:3] == [
        "localllmd 0.1.0  instance localllmd  profile cpu-only  up 2h03m  docker 27.3.1",
        "proxy http://127.0.0.1:8081/v1, http://[::1]:8081/v1",
        "",
    ]
    assert lines[3].split() == [
        "MODEL",
        "STATE",
        "DEVICE",
        "MEMORY",
        "MEASURED",
        "ENDPOINT",
        "CONTAINER",
        "IN-FLIGHT",
        "WAITING",
        "LAST",
        "USED",
        "FLAGS",
    ]
    assert set(lines[4]) == {"─"}
    assert lines[5].split() == [
        "qwen2.5-7b",
        "ready",
        "gpu0",
        "5.4G",
        "5.1G",
        "socket",
        "3f2a9c1b7d4e",
        "2",
        "3",
        "-",
        "preload,pinned",
    ]
    assert lines[6].split() == ["tiny", "stopped", "-", "1.5M", "-", "-", "-", "0", "0", "-", "-"]
    assert lines[7].split()[:2] == ["broken", "failed"]
    assert lines[8:] == ["", "errors:", "  broken: model 'broken' failed to start: exited (exit code 1)"]
    columns = [lines[3].index(word) for word in ("STATE", "ENDPOINT", "FLAGS")]
    assert [lines[5].index(cell) for cell in ("ready", "socket", "preload")] == columns  # aligned


def test_render_status_names_an_unusable_device_among_the_errors():
    devices = [
        {
            "id": "gpu0",
            "uuid": "GPU-8e41",
            "budget": 0,
            "measured_free": 0,
            "problem": "memory info failed: NVML_ERROR_GPU_IS_LOST",
        },
        {"id": "gpu1", "uuid": "GPU-f07a", "budget": 23 * 2**30, "measured_free": 20 * 2**30, "problem": None},
    ]
    text = render_status({"daemon": DAEMON, "devices": devices, "models": [model("tiny")]})
    assert text.splitlines()[-2:] == [
        "errors:",
        "  device gpu0 (GPU-8e41) is unusable: memory info failed: NVML_ERROR_GPU_IS_LOST",
    ]


def test_render_status_flags_a_partial_cpu_offload():
    offloaded = model(
        "qwen",
        state="ready",
        memory={"need": 2**30, "measured": 2**29, "partial_offload": {"size_vram": 2**29, "size": 2**30}},
    )
    text = render_status({"daemon": DAEMON, "models": [offloaded]})
    assert text.splitlines()[-1].split()[-1] == "cpu-offload"


def test_render_status_without_errors_has_no_errors_section():
    text = render_status({"daemon": DAEMON, "models": [model("tiny", pinned=True)]})
    assert "errors:" not in text
    assert text.splitlines()[-1].split() == ["tiny", "stopped", "-", "1.5M", "-", "-", "-", "0", "0", "-", "pinned"]


def test_render_status_with_no_models_says_so():
    text = render_status({"daemon": DAEMON, "models": []})
    assert text.splitlines()[3:] == ["(no models in the catalog)"]


def test_render_status_last_used_is_an_age():
    text = render_status({"daemon": DAEMON, "models": [model("tiny", last_used=time.time() - 7530)]})
    assert text.splitlines()[-1].split()[-3:] == ["2h05m", "ago", "-"]


@pytest.mark.parametrize(
    "seconds, shown",
    [
        (-5, "0s"),
        (0, "0s"),
        (0.9, "0s"),
        (59.9, "59s"),
        (119, "119s"),
        (120, "2m"),
        (150, "2m"),
        (7199, "119m"),
        (7200, "2h00m"),
        (7260, "2h01m"),
        (7384.2, "2h03m"),
        (90061, "25h01m"),
    ],
)
def test_format_age(seconds, shown):
    assert format_age(seconds) == shown


def test_config_validate_json_reports_problems_and_exits_2(config_file):
    import json

    path = config_file("models:\n  - name: a\n    gguf: nope.gguf\n")
    done = localllmctl("config", "validate", "--json", path)
    assert done.returncode == 2, done.stderr
    report = json.loads(done.stdout)
    assert report["valid"] is False and len(report["problems"]) == 1
    assert report["problems"][0].startswith(f"{path}:3: models[0].gguf: model file")
    good = config_file("profile: cpu-only\nmodels: []\n")
    done = localllmctl("config", "validate", "--json", good)
    assert (done.returncode, json.loads(done.stdout)) == (
        0,
        {"file": str(good), "valid": True, "models": [], "profile": "cpu-only"},
    )


def test_the_target_follows_the_flags_and_the_environment(monkeypatch, tmp_path):
    from supervisor.cli.ctl import build_parser, target

    for name in ("LOCALLLM_URL", "LOCALLLM_SOCKET", "LOCALLLM_TOKEN", "LOCALLLM_CACERT"):
        monkeypatch.delenv(name, raising=False)
    parse = build_parser().parse_args
    chosen = target(parse(["--socket", str(tmp_path / "control.sock"), "status"]))
    assert (chosen.socket, chosen.role) == (tmp_path / "control.sock", None)  # exactly that socket
    chosen = target(parse(["--socket", str(tmp_path / "control.sock"), "--role", "viewer", "status"]))
    assert (chosen.socket, chosen.role) == (tmp_path / "control-viewer.sock", "viewer")
    chosen = target(parse(["--role", "operator", "status"]))
    assert chosen.socket == Path("/var/lib/localllm/control-operator.sock")
    monkeypatch.setenv("LOCALLLM_TOKEN", "t" * 40)
    monkeypatch.setenv("LOCALLLM_CACERT", str(tmp_path / "ca.pem"))
    chosen = target(parse(["--url", "https://host:8443", "status"]))
    assert (chosen.url, chosen.token, chosen.cacert, chosen.socket) == (
        "https://host:8443",
        "t" * 40,
        tmp_path / "ca.pem",
        None,
    )
    assert str(chosen) == "https://host:8443"
    assert target(parse(["--url", "https://h", "--cacert", "/etc/ca.pem", "status"])).cacert == Path("/etc/ca.pem")
    with pytest.raises(SystemExit):
        parse(["--role", "root", "status"])
