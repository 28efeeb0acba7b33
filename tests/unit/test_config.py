"""supervisor.config.settings: load_config's values, defaults and every kind of error."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config.settings import Listen, load_config
from supervisor.core.errors import EXIT_BAD_INPUT, ConfigError

from .config_cases import BAD_CONFIGS, find_problem

KEY = "3f2a9c1d0b7e4a5f8c6d2e1b0a9f8e7d"  # 32 characters, as daemon.api_keys asks


@pytest.mark.parametrize("text, expected", BAD_CONFIGS)
def test_bad_config_raises_config_error_naming_line_field_and_reason(config_file, text, expected):
    path = config_file(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = caught.value.problems
    for lines, fragment in expected:
        assert find_problem(problems, path, lines, fragment), f"no '{fragment}' at line {lines} in {problems}"
    assert len(problems) == len(expected), problems
    assert caught.value.source == str(path)
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert caught.value.message.startswith(f"invalid config {path}:\n  ")


def test_unreadable_file_is_a_config_error(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == ["cannot read file: No such file or directory"]


def test_missing_model_file_is_allowed_when_files_are_not_checked(config_file):
    path = config_file("models:\n  - name: a\n    gguf: nope.gguf\n")
    config = load_config(path, check_files=False)
    assert config.models[0].gguf == path.resolve().parent / "nope.gguf"


@pytest.mark.parametrize(
    "written, seconds",
    [
        ('"5m"', 300.0),
        ('"250ms"', 0.25),
        ("30", 30.0),
        ('"30s"', 30.0),
        ('"1h"', 3600.0),
        ('"1.5h"', 5400.0),
        ("0.5", 0.5),
        ('"0"', 0.0),
    ],
)
def test_durations_become_seconds(config_file, written, seconds):
    config = load_config(
        config_file(f"""\
        daemon:
          default_ttl: {written}
        models:
          - name: a
            gguf: m.gguf
            ttl: {written}
            startup_timeout: {written if seconds else 1}
        """)
    )
    assert config.daemon.default_ttl == seconds
    assert config.models[0].ttl == seconds
    assert config.models[0].startup_timeout == (seconds or 1.0)


def test_defaults(config_file):
    config = load_config(config_file("{}\n"))
    assert config.profile == "auto"
    assert config.models == []
    assert config.daemon.proxy_listen == [Listen(host="127.0.0.1", port=8081)]
    assert [str(listen) for listen in config.daemon.proxy_listen] == ["127.0.0.1:8081"]
    assert config.daemon.instance == "localllmd"
    assert config.daemon.state_dir == Path("/var/lib/localllm")
    assert config.daemon.socket_path == Path("/var/lib/localllm/control.sock")
    assert (config.daemon.default_ttl, config.daemon.startup_timeout, config.daemon.stop_grace) == (1800.0, 120.0, 10.0)
    assert config.daemon.policy is None  # no policy: only the always-denied rules (supervisor/config/policy.py)
    assert (config.daemon.api_keys, config.daemon.allow_anonymous, config.daemon.allowed_hosts) == ([], False, [])
    limits = config.daemon.proxy_limits
    assert (limits.header_timeout, limits.body_timeout, limits.keep_alive) == (10.0, 60.0, 5.0)
    assert (limits.max_connections, limits.max_body, limits.body_budget) == (4096, 64 * 2**20, 256 * 2**20)
    assert config.daemon.request_fields.drop == ["id_slot", "cache_prompt"]
    assert config.daemon.request_fields.max_tokens is None  # the model's context size


def test_daemon_settings_as_written(config_file, tmp_path):
    config = load_config(
        config_file(f"""\
        profile: gpu-1x24g
        daemon:
          instance: lab-1
          proxy_listen: ["0.0.0.0:9000", "[::1]:9001"]
          api_keys: [{KEY}]
          port_range: 30000-30010
          state_dir: {tmp_path}/state
          labels: {{team: ml}}
        """)
    )
    daemon = config.daemon
    assert config.profile == "gpu-1x24g"
    assert daemon.instance == "lab-1"
    assert daemon.proxy_listen == [Listen(host="0.0.0.0", port=9000), Listen(host="::1", port=9001)]
    assert [str(listen) for listen in daemon.proxy_listen] == ["0.0.0.0:9000", "[::1]:9001"]
    assert daemon.api_keys == [KEY]
    assert daemon.port_range == "30000-30010"  # no longer used; older configs still load
    assert daemon.socket_path == tmp_path / "state" / "control.sock"
    assert daemon.labels == {"team": "ml"}


def test_control_socket_overrides_state_dir(config_file):
    config = load_config(config_file("daemon:\n  state_dir: /srv/llm\n  control_socket: /run/llm.sock\n"))
    assert config.daemon.socket_path == Path("/run/llm.sock")


def test_relative_gguf_resolves_against_config_directory(config_file, tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.gguf").write_bytes(b"GGUF")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(
        config_file(f"""\
        models:
          - name: rel
            gguf: sub/x.gguf
          - name: abs
            gguf: {tmp_path}/m.gguf
        """)
    )
    base = tmp_path.resolve()
    assert [m.gguf for m in config.models] == [base / "sub" / "x.gguf", tmp_path / "m.gguf"]


def test_model_named_finds_names_and_aliases(config_file):
    config = load_config(
        config_file("""\
        models:
          - name: qwen
            aliases: [gpt-4o, "org/qwen:7b"]
            gguf: m.gguf
          - name: tiny
            gguf: m.gguf
        """)
    )
    assert config.model_named("qwen").name == "qwen"
    assert config.model_named("org/qwen:7b").name == "qwen"
    assert config.model_named("tiny").names == ["tiny"]
    assert config.model_named("gpt-3.5") is None


def test_relative_profiles_dir_resolves_against_config_directory(config_file, tmp_path, monkeypatch):
    # Like gguf paths, a relative profiles_dir must not depend on the current directory
    # (localllmctl runs beside the file; the daemon under systemd runs in /).
    (tmp_path / "myprofiles").mkdir()
    (tmp_path / "myprofiles" / "lab-box.yaml").write_text(
        "name: lab-box\nhardware: {ram_gib: 8, cpu_cores: 2}\ndefaults: {images: {llamacpp: img:1}}\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(config_file("profile: lab-box\nprofiles_dir: myprofiles\n"))
    assert config.profile == "lab-box"


def test_missing_profiles_dir_is_reported_even_with_auto_profile(config_file, tmp_path):
    # The daemon loads profiles_dir at start-up whatever the profile; validation must catch it too.
    path = config_file(f"profile: auto\nprofiles_dir: {tmp_path}/no-such-dir\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "profiles directory does not exist" in caught.value.message


def test_the_shipped_example_config_is_valid_apart_from_its_model_file():
    example = Path(__file__).resolve().parents[2] / "systemd" / "config.example.yaml"
    config = load_config(example, check_files=False)
    assert config.profile == "auto"
    assert config.daemon.startup_timeout == 600.0
    assert [m.name for m in config.models] == ["llama-3.1-8b"]


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:8081", "127.0.0.2:8081", "[::1]:8081", "localhost:8081", "LOCALHOST:8081"]
)
def test_a_loopback_proxy_needs_no_keys(config_file, listen):
    assert load_config(config_file(f"daemon:\n  proxy_listen: '{listen}'\n")).daemon.api_keys == []


@pytest.mark.parametrize("extra", [f"api_keys: [{KEY}]", "allow_anonymous: true"])
def test_a_proxy_beyond_loopback_needs_keys_or_anonymous_access_said_in_so_many_words(config_file, extra):
    config = load_config(config_file(f"daemon:\n  proxy_listen: ['0.0.0.0:8081', '192.168.1.5:8081']\n  {extra}\n"))
    assert [listen.host for listen in config.daemon.proxy_listen] == ["0.0.0.0", "192.168.1.5"]


def test_edge_settings_as_written(config_file):
    config = load_config(
        config_file("""\
        daemon:
          allowed_hosts: [llm.example.com, "[::1]", 127.0.0.1]
          proxy_limits: {header_timeout: 2s, body_timeout: 30s, keep_alive: 1s, max_connections: 100,
                         max_body: 1MiB, body_budget: 1MiB}
          request_fields: {drop: [id_slot], max_tokens: 512}
        """)
    )
    daemon = config.daemon
    assert daemon.allowed_hosts == ["llm.example.com", "[::1]", "127.0.0.1"]
    limits = daemon.proxy_limits
    assert (limits.header_timeout, limits.body_timeout, limits.keep_alive, limits.max_connections) == (2, 30, 1, 100)
    assert limits.max_body == limits.body_budget == 2**20
    assert (daemon.request_fields.drop, daemon.request_fields.max_tokens) == (["id_slot"], 512)


@pytest.mark.parametrize(
    "daemon",
    [
        "api_keys: [hunter2-short-key]",
        "control_token: hunter2-short-key",
        "control_tokens: [{token: hunter2-short-key, role: viewer}]",
    ],
    ids=["api_key", "control_token", "control_tokens"],
)
def test_a_problem_with_a_secret_never_quotes_it(config_file, daemon):
    with pytest.raises(ConfigError) as caught:
        load_config(config_file(f"daemon:\n  {daemon}\n"))
    assert "32" in str(caught.value) and "hunter2" not in str(caught.value)


def test_a_problem_with_another_field_still_quotes_what_it_got(config_file):
    with pytest.raises(ConfigError, match=r"\(got 'x'\)"):
        load_config(config_file("daemon:\n  max_queue: x\n"))
