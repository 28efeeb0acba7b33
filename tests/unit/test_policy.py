"""supervisor.config.policy: the rules, one by one, and an apply held to the running daemon's policy."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from supervisor.config.policy import (
    Policy,
    denied_env,
    escapes,
    flag_of,
    matches,
    path_problems,
)
from supervisor.config.settings import Config, load_config
from supervisor.core.errors import ApplyRefused, ConfigError
from supervisor.fleet.rollout import Rollout
from supervisor.state.generations import GenerationStore


@pytest.mark.parametrize(
    "arg, flag",
    [
        ("--threads", "--threads"),
        ("8", None),
        ("-1", None),
        ("-0.5", None),
        ("/v1", None),
        ("-t", "-t"),
        ("--api_key", "--api-key"),
        ("--host=0.0.0.0", "--host"),
        ("-no_kvu", "-no_kvu"),
        ("-inf", None),
    ],
)
def test_flag_of_reads_an_argument_as_llama_cpp_would(arg, flag):
    assert flag_of(arg) == flag


@pytest.mark.parametrize(
    "name, patterns, allowed",
    [
        ("ollama/ollama", ["ollama/ollama"], True),
        ("ollama/ollama:0.5", ["ollama/ollama"], False),  # exact means exact
        ("ollama/ollama:0.5", ["ollama/ollama:*"], True),
        ("ollama/ollama-evil:1", ["ollama/ollama:*"], False),
        ("ghcr.io/ggml-org/llama.cpp:server", ["ghcr.io/ggml-org/*"], True),
        ("anything", ["*"], True),
        ("STANDIN_FAIL", ["STANDIN_*"], True),
    ],
)
def test_matches_exact_names_and_trailing_star_prefixes(name, patterns, allowed):
    assert matches(name, patterns) is allowed


@pytest.mark.parametrize(
    "name, denied",
    [
        ("LD_PRELOAD", True),
        ("LD_LIBRARY_PATH", True),
        ("PATH", True),
        ("NVIDIA_VISIBLE_DEVICES", True),
        ("GCONV_PATH", True),
        ("OLLAMA_DEBUG", False),
        ("STANDIN_REGISTRY", False),
        ("LDAP_URI", False),
    ],
)
def test_denied_env(name, denied):
    assert (denied_env(name) is not None) is denied


def test_a_symlink_inside_the_root_to_a_host_file_escapes(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    (root / "ok.gguf").write_bytes(b"GGUF")
    (root / "shadow.gguf").symlink_to("/etc/shadow")
    (root / "alias.gguf").symlink_to(root / "ok.gguf")  # a link that stays inside is fine
    real_root = root.resolve()
    assert escapes(root / "ok.gguf", real_root) is None
    assert escapes(root / "alias.gguf", real_root) is None
    assert escapes(root / "shadow.gguf", real_root) == (
        f"{root / 'shadow.gguf'} (which resolves to /etc/shadow) is outside daemon.policy.models_root {real_root}"
    )
    assert "is outside" in escapes(root / ".." / ".." / "etc" / "shadow", real_root)
    assert "is outside" in escapes(root, real_root)  # the root itself is no model file


def test_a_root_reached_through_a_symlink_holds_its_own_files(tmp_path):
    real = tmp_path / "disk" / "models"
    real.mkdir(parents=True)
    (real / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "models").symlink_to(real)
    config = config_with(tmp_path, models_root=tmp_path / "models", gguf=tmp_path / "models" / "m.gguf")
    assert path_problems(config, config.daemon.policy, check_files=True) == []


def test_ollama_store_may_be_the_root_or_the_default_but_not_beside_it(tmp_path):
    root = tmp_path / "models"
    (root / "ollama").mkdir(parents=True)
    for store, refused in [
        (root, False),
        (root / "ollama", False),
        (tmp_path / "state" / "ollama", False),
        (tmp_path / "state", True),
        (Path("/"), True),
    ]:
        config = config_with(tmp_path, models_root=root, models_dir=store)
        problems = path_problems(config, config.daemon.policy, check_files=True)
        assert bool(problems) is refused, (store, problems)


def config_with(tmp_path: Path, models_root: Path, gguf: Path | None = None, models_dir: Path | None = None):
    """A Config as validated, before load_config's checks (which would refuse it)."""
    return Config.model_validate(
        {
            "profile": "cpu-only",
            "daemon": {"state_dir": str(tmp_path / "state"), "policy": {"models_root": models_root}},
            "ollama": {"models_dir": models_dir},
            "models": [{"name": "a", "gguf": gguf}] if gguf else [],
        }
    )


def test_without_a_policy_only_the_always_denied_rules_hold(config_file):
    config = load_config(
        config_file("""\
        ollama:
          image: my/ollama:dev
          models_dir: /
          env: {STANDIN_REGISTRY: "{}", OLLAMA_ORIGINS: "*"}
        models:
          - name: a
            gguf: m.gguf
            image: my/llama:dev
            extra_args: [--no-such-flag, --api-prefix, /elsewhere]
        """)
    )
    assert config.daemon.policy is None


def test_a_config_within_its_policy_loads(config_file, tmp_path):
    config = load_config(
        config_file(f"""\
        profile: cpu-only
        daemon:
          policy:
            allowed_images: ["localllm/llama-server:*", "ollama/ollama"]
            models_root: {tmp_path}
            allowed_extra_args: [--threads, -t]
            allowed_ollama_env: [OLLAMA_DEBUG, "STANDIN_*"]
        ollama:
          env: {{OLLAMA_DEBUG: "1", STANDIN_PULL_SECONDS: "0.5"}}
        models:
          - name: a
            gguf: m.gguf
            extra_args: [--threads, "2"]
          - name: b
            backend: ollama
            tag: llama3.2:1b
        """)
    )
    assert config.daemon.policy == Policy(
        allowed_images=["localllm/llama-server:*", "ollama/ollama"],
        models_root=tmp_path,
        allowed_extra_args=["--threads", "-t"],
        allowed_ollama_env=["OLLAMA_DEBUG", "STANDIN_*"],
    )


def test_profile_auto_must_allow_the_image_of_every_profile_it_may_pick(config_file):
    path = config_file("""\
        daemon:
          policy:
            allowed_images: ["localllm/llama-server:*"]
        models:
          - name: a
            gguf: m.gguf
        """)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert all("ghcr.io/ggml-org/llama.cpp:server-cuda" in p for p in caught.value.problems)
    assert {re.search(r"profile (\S+)'s", p).group(1) for p in caught.value.problems} == {
        "gpu-1x8g",
        "gpu-1x24g",
        "gpu-2x24g",
        "gpu-1x80g",
    }


# -- an apply is held to the running daemon's policy


def running_rollout(tmp_path: Path, text: str) -> tuple[Rollout, Path]:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    path = tmp_path / "running.yaml"
    path.write_text(text)
    events = SimpleNamespace(publish=lambda *args, **kwargs: None)
    fleet = SimpleNamespace(config=load_config(path), closing=False, events=events)
    return Rollout(fleet, GenerationStore(tmp_path / "generations")), path


RUNNING = """\
profile: cpu-only
daemon:
  policy:
    allowed_images: ["localllm/llama-server:*"]
models:
  - name: a
    gguf: m.gguf
"""


def test_an_apply_that_drops_the_policy_is_still_held_to_the_running_one(tmp_path):
    rollout, path = running_rollout(tmp_path, RUNNING)
    text = RUNNING.replace("""  policy:\n    allowed_images: ["localllm/llama-server:*"]\n""", "  {}\n").replace(
        "    gguf: m.gguf\n", "    gguf: m.gguf\n    image: alpine:3\n"
    )
    with pytest.raises(ConfigError) as caught:
        asyncio.run(rollout.apply(text, str(path), path))
    assert caught.value.problems == [
        f"{path}:7: models[0].image: image 'alpine:3' is not in daemon.policy.allowed_images"
    ]
    assert rollout.store.generations[-1].status == "invalid"


def test_an_apply_that_only_changes_the_policy_is_refused_naming_it(tmp_path):
    rollout, path = running_rollout(tmp_path, RUNNING)
    text = RUNNING.replace('["localllm/llama-server:*"]', '["localllm/llama-server:*", "alpine:*"]')
    for attempt in (rollout.preview(text, str(path), path), rollout.apply(text, str(path), path)):
        with pytest.raises(ApplyRefused) as caught:
            asyncio.run(attempt)
        assert caught.value.message.startswith("the new config changes daemon.policy, which only a restart")
    assert caught.value.http_status == 409
