"""supervisor.backends.llamacpp: the container that serves a catalog entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.backends import backend_for, llamacpp
from supervisor.config import DaemonSettings, ModelEntry
from supervisor.containers import BindMount, container_name
from supervisor.profiles import load_profiles

PROFILES = load_profiles()
CPU = PROFILES["cpu-only"]
GPU = PROFILES["gpu-1x24g"]


def entry(tmp_path: Path, **fields) -> ModelEntry:
    return ModelEntry(name=fields.pop("name", "tiny"), gguf=tmp_path / "models" / "tiny.gguf", **fields)


def flag(command: tuple[str, ...], name: str) -> str:
    assert command.count(name) == 1, command
    return command[command.index(name) + 1]


def test_cpu_profile_spec(tmp_path):
    settings = DaemonSettings(instance="lab", labels={"team": "ml", "env": "dev"})
    spec = llamacpp.container_spec(entry(tmp_path), CPU, settings, 28100)
    assert spec.command == (
        "--model", "/models/tiny.gguf", "--alias", "tiny", "--host", "127.0.0.1", "--port", "28100",
        "--ctx-size", "4096", "--parallel", "1",
    )
    assert spec.gpu_device_ids is None
    assert spec.image == CPU.defaults.images.llamacpp == "localllm/llama-server:0.3.36-cpu"
    assert spec.mounts == (BindMount(str((tmp_path / "models" / "tiny.gguf").resolve()), "/models/tiny.gguf", True),)
    assert (spec.name, spec.owner, spec.model, spec.backend, spec.port) == (
        container_name("lab", "tiny") + "-28100", "lab", "tiny", "llamacpp", 28100)
    assert spec.extra_labels == (("env", "dev"), ("team", "ml"))


@pytest.mark.parametrize("profile_name", ["gpu-1x8g", "gpu-1x24g", "gpu-2x24g", "gpu-1x80g"])
def test_gpu_profile_uses_all_gpus_and_profile_layers(tmp_path, profile_name):
    profile = PROFILES[profile_name]
    spec = llamacpp.container_spec(entry(tmp_path), profile, DaemonSettings(), 28150)
    assert spec.gpu_device_ids == ()
    assert flag(spec.command, "--n-gpu-layers") == str(profile.defaults.gpu_layers) == "999"
    assert flag(spec.command, "--ctx-size") == str(profile.defaults.context_size)
    assert flag(spec.command, "--parallel") == str(profile.defaults.parallel)
    assert spec.image == "ghcr.io/ggml-org/llama.cpp:server-cuda"


@pytest.mark.parametrize("gpu_layers, shown", [(None, "999"), (20, "20"), (0, "0"), (-1, "-1")])
def test_model_gpu_layers_override_the_profile(tmp_path, gpu_layers, shown):
    spec = llamacpp.container_spec(entry(tmp_path, gpu_layers=gpu_layers), GPU, DaemonSettings(), 28100)
    assert flag(spec.command, "--n-gpu-layers") == shown


def test_model_gpu_layers_are_ignored_without_gpus(tmp_path):
    spec = llamacpp.container_spec(entry(tmp_path, gpu_layers=20), CPU, DaemonSettings(), 28100)
    assert "--n-gpu-layers" not in spec.command
    assert spec.gpu_device_ids is None


@pytest.mark.parametrize("profile, context_size, shown", [
    (CPU, None, "4096"), (CPU, 512, "512"), (GPU, None, "16384"), (GPU, 65536, "65536"),
])
def test_model_context_size_overrides_the_profile(tmp_path, profile, context_size, shown):
    spec = llamacpp.container_spec(entry(tmp_path, context_size=context_size), profile, DaemonSettings(), 28100)
    assert flag(spec.command, "--ctx-size") == shown


def test_server_binds_loopback_on_the_given_port(tmp_path):
    spec = llamacpp.container_spec(entry(tmp_path), GPU, DaemonSettings(), 28177)
    assert (flag(spec.command, "--host"), flag(spec.command, "--port"), spec.port) == ("127.0.0.1", "28177", 28177)
    assert llamacpp.base_url(28177) == "http://127.0.0.1:28177"
    assert llamacpp.readiness_path == "/health"


def test_extra_args_are_appended_last(tmp_path):
    model = entry(tmp_path, extra_args=["--flash-attn", "--threads", "4"])
    for profile in (CPU, GPU):
        spec = llamacpp.container_spec(model, profile, DaemonSettings(), 28100)
        assert spec.command[-3:] == ("--flash-attn", "--threads", "4")


def test_model_is_mounted_read_only_under_its_basename(tmp_path):
    model = ModelEntry(name="org/qwen:7b", gguf=tmp_path / "deep" / "dir" / "Qwen2.5-7B-Q4_K_M.gguf")
    spec = llamacpp.container_spec(model, CPU, DaemonSettings(), 28100)
    (mount,) = spec.mounts
    assert mount == BindMount(str(model.gguf.resolve()), "/models/Qwen2.5-7B-Q4_K_M.gguf", read_only=True)
    assert flag(spec.command, "--model") == "/models/Qwen2.5-7B-Q4_K_M.gguf"
    assert flag(spec.command, "--alias") == "org/qwen:7b"


def test_spec_is_pure(tmp_path):
    model = entry(tmp_path)
    first = llamacpp.container_spec(model, GPU, DaemonSettings(), 28100)
    assert llamacpp.container_spec(model, GPU, DaemonSettings(), 28100) == first
    assert llamacpp.container_spec(model, CPU, DaemonSettings(), 28100).config_hash() != first.config_hash()


def test_backend_for_llamacpp():
    assert backend_for("llamacpp") is llamacpp
