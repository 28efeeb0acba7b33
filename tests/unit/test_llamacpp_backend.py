"""supervisor.core.backends.llamacpp: the container that serves a catalog entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config.profiles import load_profiles
from supervisor.config.settings import DaemonSettings, ModelEntry
from supervisor.core.backends import backend_for, llamacpp
from supervisor.core.containers import BindMount, Endpoint, container_name, memory_limit_for
from supervisor.core.estimate import LaunchSettings
from supervisor.core.placement import Device

PROFILES = load_profiles()
CPU = PROFILES["cpu-only"]
GPU = PROFILES["gpu-1x24g"]
SOCKET = Endpoint(socket="0123abcd4567ef89")
GPU0 = Device(id="gpu0", budget=20 << 30, index=0, uuid="GPU-8d2c7e1a-0000-4000-8000-000000000001")
PINNED_CPU = (
    "--ctx-size",
    "4096",
    "--parallel",
    "1",
    "--no-kv-unified",
    "--ubatch-size",
    "512",
    "--cache-type-k",
    "f16",
    "--cache-type-v",
    "f16",
    "--flash-attn",
    "on",
    "--fit",
    "off",
)


def entry(tmp_path: Path, **fields) -> ModelEntry:
    return ModelEntry(name=fields.pop("name", "tiny"), gguf=tmp_path / "models" / "tiny.gguf", **fields)


def flag(command: tuple[str, ...], name: str) -> str:
    assert command.count(name) == 1, command
    return command[command.index(name) + 1]


def test_cpu_profile_spec(tmp_path):
    settings = DaemonSettings(instance="lab", labels={"team": "ml", "env": "dev"})
    spec = llamacpp.container_spec(entry(tmp_path), CPU, settings, SOCKET)
    assert spec.command == (
        "--model",
        "/models/tiny.gguf",
        "--alias",
        "tiny",
        "--host",
        "/run/llama/http.sock",
        "--no-webui",
        "--no-slots",
        *PINNED_CPU,
    )
    assert spec.gpu_device_ids is None
    assert spec.image == CPU.defaults.images.llamacpp == "localllm/llama-server:0.3.36-cpu"
    assert spec.mounts == (
        BindMount(str((tmp_path / "models" / "tiny.gguf").resolve()), "/models/tiny.gguf", True),
        BindMount(f"/var/lib/localllm/servers/{SOCKET.socket}", "/run/llama", False),
    )
    assert (spec.name, spec.owner, spec.model, spec.backend, spec.endpoint, spec.network) == (
        container_name("lab", "tiny") + "-0123abcd",
        "lab",
        "tiny",
        "llamacpp",
        SOCKET,
        "none",
    )
    assert spec.extra_labels == (("env", "dev"), ("team", "ml"))


@pytest.mark.parametrize("profile_name", ["gpu-1x8g", "gpu-1x24g", "gpu-2x24g", "gpu-1x80g"])
def test_gpu_profile_pins_its_gpu_and_profile_layers(tmp_path, profile_name):
    profile = PROFILES[profile_name]
    spec = llamacpp.container_spec(entry(tmp_path), profile, DaemonSettings(), SOCKET, GPU0)
    assert spec.gpu_device_ids == (GPU0.uuid,)
    assert spec.device == "gpu0"
    assert flag(spec.command, "--n-gpu-layers") == str(profile.defaults.gpu_layers) == "999"
    assert flag(spec.command, "--ctx-size") == str(profile.defaults.context_size)
    assert flag(spec.command, "--parallel") == str(profile.defaults.parallel)
    assert spec.image == "ghcr.io/ggml-org/llama.cpp:server-cuda-b11312"  # the build estimate.py models


def test_gpu_command_pins_fit_flash_attention_kv_unified_and_the_device(tmp_path):
    spec = llamacpp.container_spec(entry(tmp_path), GPU, DaemonSettings(), SOCKET, GPU0)
    assert spec.command[8:] == (
        "--ctx-size",
        "16384",
        "--parallel",
        "2",
        "--no-kv-unified",
        "--ubatch-size",
        "512",
        "--cache-type-k",
        "f16",
        "--cache-type-v",
        "f16",
        "--flash-attn",
        "on",
        "--fit",
        "off",
        "--n-gpu-layers",
        "999",
        "--device",
        "CUDA0",  # the one GPU the container is given is CUDA0 inside it
    )


@pytest.mark.parametrize("flash_attention, shown", [(True, "on"), (False, "off")])
def test_flash_attention_follows_the_model_and_reaches_the_estimate(tmp_path, flash_attention, shown):
    model = entry(tmp_path, flash_attention=flash_attention)
    for profile, device in ((CPU, None), (GPU, GPU0)):
        assert (
            flag(llamacpp.container_spec(model, profile, DaemonSettings(), SOCKET, device).command, "--flash-attn")
            == shown
        )
        assert llamacpp.launch_settings(model, profile).flash_attention is flash_attention


@pytest.mark.parametrize(
    "launch, expected",
    [
        (LaunchSettings(context=2048), ["--no-kv-unified"]),
        (LaunchSettings(context=2048, parallel=4, kv_unified=True), ["--kv-unified"]),
    ],
)
def test_the_kv_unified_flag_follows_the_launch_settings(launch, expected):
    flags = llamacpp.launch_flags(launch)
    assert [f for f in flags if "kv-unified" in f] == expected


@pytest.mark.parametrize("gpu_layers, shown", [(None, "999"), (20, "20"), (0, "0"), (-1, "all")])
def test_model_gpu_layers_override_the_profile(tmp_path, gpu_layers, shown):
    # -1 is "every layer" to us, but "auto" (fit to free memory) to llama.cpp: it becomes "all"
    spec = llamacpp.container_spec(entry(tmp_path, gpu_layers=gpu_layers), GPU, DaemonSettings(), SOCKET, GPU0)
    assert flag(spec.command, "--n-gpu-layers") == shown


@pytest.mark.parametrize(
    "device, ids",
    [
        (GPU0, ("GPU-8d2c7e1a-0000-4000-8000-000000000001",)),  # the UUID, when NVML gave one
        (Device(id="gpu1", budget=1, index=1), ("1",)),  # else the index
        (Device(id="gpu1", budget=1, index=1, uuid=""), ("1",)),
    ],
)
def test_the_gpu_is_requested_by_uuid_else_by_index(tmp_path, device, ids):
    spec = llamacpp.container_spec(entry(tmp_path), GPU, DaemonSettings(), SOCKET, device)
    assert spec.gpu_device_ids == ids
    assert spec.device == device.id


@pytest.mark.parametrize(
    "device, message",
    [
        (None, "has GPUs, but no GPU was given"),
        (Device(id="gpu7", budget=1), "gpu7 has neither a UUID nor an index"),
    ],
)
def test_a_gpu_profile_without_a_known_gpu_is_an_error_not_every_gpu(tmp_path, device, message):
    # An empty device request means every GPU to Docker, and the server would spread over them.
    with pytest.raises(ValueError, match=message):
        llamacpp.container_spec(entry(tmp_path), GPU, DaemonSettings(), SOCKET, device)


def test_model_gpu_layers_are_ignored_without_gpus(tmp_path):
    spec = llamacpp.container_spec(entry(tmp_path, gpu_layers=20), CPU, DaemonSettings(), SOCKET)
    assert "--n-gpu-layers" not in spec.command
    assert spec.gpu_device_ids is None


@pytest.mark.parametrize(
    "profile, context_size, shown",
    [
        (CPU, None, "4096"),
        (CPU, 512, "512"),
        (GPU, None, "16384"),
        (GPU, 65536, "65536"),
    ],
)
def test_model_context_size_overrides_the_profile(tmp_path, profile, context_size, shown):
    device = GPU0 if profile.has_gpus else None
    spec = llamacpp.container_spec(
        entry(tmp_path, context_size=context_size), profile, DaemonSettings(), SOCKET, device
    )
    assert flag(spec.command, "--ctx-size") == shown


@pytest.mark.parametrize("profile, device", [(CPU, None), (GPU, GPU0)], ids=["cpu", "gpu"])
def test_the_server_listens_on_its_socket_only_with_no_network_no_web_ui_and_no_slots(tmp_path, profile, device):
    settings = DaemonSettings(state_dir=tmp_path / "state")
    spec = llamacpp.container_spec(entry(tmp_path), profile, settings, SOCKET, device)
    assert (flag(spec.command, "--host"), "--port" in spec.command, spec.network) == (
        "/run/llama/http.sock",
        False,
        "none",
    )
    assert {"--no-webui", "--no-slots"} <= set(spec.command)
    socket_dir = next(m for m in spec.mounts if m.target == llamacpp.SOCKET_DIR)
    assert (socket_dir.source, socket_dir.read_only) == (str(tmp_path / "state" / "servers" / SOCKET.socket), False)
    assert spec.endpoint.url == f"http://{SOCKET.socket}.sock.localllm"
    assert llamacpp.readiness_path == "/health"


def test_the_server_runs_as_the_user_it_is_given(tmp_path):
    spec = llamacpp.container_spec(entry(tmp_path), CPU, DaemonSettings(), SOCKET, user=(998, 997))
    assert spec.confinement.user == "998:997"


def test_extra_args_are_appended_last(tmp_path):
    model = entry(tmp_path, extra_args=["--mlock", "--threads", "4"])
    for profile, device in ((CPU, None), (GPU, GPU0)):
        spec = llamacpp.container_spec(model, profile, DaemonSettings(), SOCKET, device)
        assert spec.command[-3:] == ("--mlock", "--threads", "4")


def test_model_is_mounted_read_only_under_its_basename(tmp_path):
    model = ModelEntry(name="org/qwen:7b", gguf=tmp_path / "deep" / "dir" / "Qwen2.5-7B-Q4_K_M.gguf")
    spec = llamacpp.container_spec(model, CPU, DaemonSettings(), SOCKET)
    mount, _socket_dir = spec.mounts
    assert mount == BindMount(str(model.gguf.resolve()), "/models/Qwen2.5-7B-Q4_K_M.gguf", read_only=True)
    assert flag(spec.command, "--model") == "/models/Qwen2.5-7B-Q4_K_M.gguf"
    assert flag(spec.command, "--alias") == "org/qwen:7b"


def test_spec_is_pure(tmp_path):
    model = entry(tmp_path)
    first = llamacpp.container_spec(model, GPU, DaemonSettings(), SOCKET, GPU0)
    assert llamacpp.container_spec(model, GPU, DaemonSettings(), SOCKET, GPU0) == first
    assert llamacpp.container_spec(model, CPU, DaemonSettings(), SOCKET).config_hash() != first.config_hash()


def test_backend_for_llamacpp():
    assert backend_for("llamacpp") is llamacpp


def test_a_models_own_parallel_slots_reach_the_command_and_the_estimate(tmp_path):
    entry = ModelEntry(name="m", gguf=tmp_path / "m.gguf", parallel=4, context_size=8192)
    assert llamacpp.launch_settings(entry, CPU).parallel == 4
    command = llamacpp.container_spec(entry, CPU, DaemonSettings(), SOCKET).command
    assert command[command.index("--parallel") + 1] == "4"


@pytest.mark.parametrize("profile, device", [(CPU, None), (GPU, GPU0)], ids=["cpu", "gpu"])
def test_the_server_runs_with_least_privilege(tmp_path, profile, device):
    confinement = llamacpp.container_spec(entry(tmp_path), profile, DaemonSettings(), SOCKET, device).confinement
    assert confinement.cap_drop == ("ALL",)  # a port above 1024 and a mounted file need no capability
    assert confinement.security_opt == ("no-new-privileges",)
    assert confinement.read_only_root
    assert dict(confinement.tmpfs) == {"/tmp": "rw,noexec,nosuid,nodev,size=64m,mode=1777"}
    assert confinement.user == "65534:65534"  # by number: the CPU image has no /etc/passwd
    assert confinement.pids_limit == llamacpp.PIDS_LIMIT == 2048
    assert confinement.memory_limit is None  # no need given: no limit


def test_a_cpu_profile_limits_memory_to_the_need_with_a_margin(tmp_path):
    need = 3 << 30
    spec = llamacpp.container_spec(entry(tmp_path), CPU, DaemonSettings(), SOCKET, memory_need=need)
    assert spec.confinement.memory_limit == memory_limit_for(need) == int(need * 1.25) + (256 << 20)
    unlimited = llamacpp.container_spec(entry(tmp_path), CPU, DaemonSettings(), SOCKET)
    assert spec.config_hash() != unlimited.config_hash()  # a new limit recreates the container
    assert (
        llamacpp.container_spec(entry(tmp_path), CPU, DaemonSettings(), SOCKET, memory_need=need + 1).config_hash()
        != spec.config_hash()
    )


def test_a_gpu_profile_gets_no_memory_limit_and_keeps_only_its_device_request(tmp_path):
    spec = llamacpp.container_spec(entry(tmp_path), GPU, DaemonSettings(), SOCKET, GPU0, memory_need=3 << 30)
    assert spec.confinement.memory_limit is None
    assert spec.gpu_device_ids == (GPU0.uuid,)
    assert spec.confinement == llamacpp.container_spec(entry(tmp_path), GPU, DaemonSettings(), SOCKET, GPU0).confinement
