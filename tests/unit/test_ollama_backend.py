"""The Ollama backend's pure parts: catalog validation, the server's container, model specs, sizes from /api/show."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config.profiles import load_profiles
from supervisor.config.schema import parse_size
from supervisor.config.settings import Config, ModelEntry, OllamaSettings, normal_tag
from supervisor.core.backends import ollama, ollama_relay
from supervisor.core.containers import Endpoint
from supervisor.core.errors import ConfigError
from supervisor.core.placement import Device
from supervisor.fleet.sizing import OLLAMA_PLACEHOLDER, size_model
from supervisor.runtime.ollama_api import estimate_from_show, find_loaded, memory_in_use, same_tag
from supervisor.state.learned import learned_key

PROFILES = load_profiles()


def config(**ollama) -> Config:
    return Config.model_validate(
        {
            "profile": "cpu-only",
            "daemon": {"instance": "t", "state_dir": "/var/lib/x", "labels": {"team": "a"}},
            "ollama": ollama,
            "models": [{"name": "q", "backend": "ollama", "tag": "qwen:1b"}],
        }
    )


def test_server_spec_carries_the_environment_the_store_and_no_gpu_on_cpu():
    spec = ollama.server_spec(
        config(num_parallel=2, flash_attention=True, env={"OLLAMA_DEBUG": "1"}), PROFILES["cpu-only"], SOCKET
    )
    assert spec.command == ("serve",) and spec.image == "ollama/ollama"
    # its own network namespace (a bridge network: pulls), listening on loopback there; reached through the relay
    assert (spec.endpoint, spec.network) == (SOCKET, "localllm-t")
    assert spec.entrypoint == ollama_relay.entrypoint("http.sock")
    assert spec.entrypoint[:2] == ("perl", "-e") and spec.entrypoint[3:] == (
        "--",
        "/run/localllm/http.sock",
        "11434",
        "/bin/ollama",
    )
    assert dict(spec.environment) == {
        "OLLAMA_HOST": "127.0.0.1:11434",
        "OLLAMA_MODELS": "/home/ollama/.ollama/models",
        "HOME": "/home/ollama",
        "OLLAMA_KEEP_ALIVE": "-1",
        "OLLAMA_NUM_PARALLEL": "2",
        "OLLAMA_FLASH_ATTENTION": "1",
        "OLLAMA_CONTEXT_LENGTH": "4096",
        "OLLAMA_MAX_LOADED_MODELS": "64",
        "OLLAMA_DEBUG": "1",
    }
    store, sockets = spec.mounts
    assert (store.source, store.target, store.read_only) == ("/var/lib/x/ollama", "/home/ollama/.ollama", False)
    assert (sockets.source, sockets.target, sockets.read_only) == (
        f"/var/lib/x/servers/{SOCKET.socket}",
        "/run/localllm",
        False,
    )
    assert spec.gpu_device_ids is None and spec.device == "cpu"
    assert spec.labels()["io.localllm.model"] == "_ollama" and spec.labels()["team"] == "a"


SOCKET = Endpoint(socket="00112233aabbccdd")
GPU1 = Device("gpu1", 20 * 2**30, index=1, uuid="GPU-5b1e")


def test_server_spec_is_confined_and_runs_as_the_stores_owner_when_named():
    spec = ollama.server_spec(config(), PROFILES["cpu-only"], SOCKET, store_owner=(998, 997))
    confinement = spec.confinement
    assert confinement.cap_drop == ("ALL",) and confinement.security_opt == ("no-new-privileges",)
    assert confinement.read_only_root and confinement.user == "998:997"
    assert dict(confinement.tmpfs)["/tmp"].startswith("rw,noexec,")  # runners may write temporary files
    assert confinement.pids_limit == ollama.PIDS_LIMIT == 4096
    assert confinement.memory_limit is None  # what it holds changes with every load
    as_root = ollama.server_spec(config(), PROFILES["cpu-only"], SOCKET)
    assert as_root.confinement.user is None and as_root.confinement.cap_drop == ("ALL",)
    assert as_root.config_hash() != spec.config_hash()  # a new store owner recreates the server


def test_home_follows_the_store_and_the_config_may_not_set_it():
    spec = ollama.server_spec(config(), PROFILES["cpu-only"], SOCKET)
    assert dict(spec.environment)["HOME"] == ollama.HOME
    with pytest.raises(ValueError, match="HOME: set by localllm"):
        config(env={"HOME": "/root"})


def test_server_spec_on_a_gpu_profile_keeps_the_confinement():
    spec = ollama.server_spec(config(device="gpu1"), PROFILES["gpu-2x24g"], SOCKET, GPU1, store_owner=(998, 997))
    assert spec.gpu_device_ids == ("GPU-5b1e",)
    assert (
        spec.confinement
        == ollama.server_spec(config(), PROFILES["cpu-only"], SOCKET, store_owner=(998, 997)).confinement
    )


def test_server_spec_on_a_gpu_profile_sees_only_its_device_by_uuid_and_gets_the_profiles_image():
    spec = ollama.server_spec(config(image="my/ollama:1", device="gpu1"), PROFILES["gpu-2x24g"], SOCKET, GPU1)
    assert spec.gpu_device_ids == ("GPU-5b1e",) and spec.image == "my/ollama:1" and spec.device == "gpu1"
    by_index = ollama.server_spec(config(), PROFILES["gpu-2x24g"], SOCKET, Device("gpu0", 2**30, index=0))
    assert by_index.gpu_device_ids == ("0",) and by_index.device == "gpu0"


@pytest.mark.parametrize(
    "settings, device",
    [
        ({}, None),  # no device: it would see every GPU
        ({}, GPU1),  # not the configured one (default gpu0)
        ({"device": "gpu1"}, Device("gpu1", 2**30)),  # a GPU it cannot ask Docker for
    ],
)
def test_server_spec_on_a_gpu_profile_without_its_device_is_an_error(settings, device):
    with pytest.raises(ValueError, match="the Ollama server needs its GPU"):
        ollama.server_spec(config(**settings), PROFILES["gpu-2x24g"], SOCKET, device)


def test_ollama_models_are_sized_with_the_servers_parallel_slots_and_flash_attention():
    launch = ollama.launch_settings(
        OllamaSettings(num_parallel=3, flash_attention=True, context_size=8192), PROFILES["gpu-1x24g"]
    )
    assert (launch.context, launch.parallel, launch.flash_attention, launch.on_gpu) == (8192, 3, True, True)


def test_model_hash_changes_with_the_server_and_the_tag():
    profile = PROFILES["cpu-only"]
    entry = ModelEntry(name="q", backend="ollama", tag="qwen:1b")
    base = ollama.model_spec(entry, ollama.server_spec(config(context_size=2048), profile, SOCKET), None)
    same = ollama.model_spec(entry, ollama.server_spec(config(context_size=2048), profile, SOCKET), None)
    other_server = ollama.model_spec(entry, ollama.server_spec(config(num_parallel=4), profile, SOCKET), None)
    other_tag = ollama.model_spec(
        entry.model_copy(update={"tag": "qwen:7b"}),
        ollama.server_spec(config(context_size=2048), profile, SOCKET),
        None,
    )
    assert base.config_hash() == same.config_hash()
    assert len({base.config_hash(), other_server.config_hash(), other_tag.config_hash()}) == 3
    assert (base.endpoint, base.device, base.tag, base.context) == (SOCKET, "cpu", "qwen:1b", 2048)


@pytest.mark.parametrize(
    "entry, problem",
    [
        ({"name": "a", "backend": "ollama"}, "an ollama model needs 'tag'"),
        ({"name": "a", "backend": "ollama", "tag": "x:1", "gguf": "m.gguf"}, "gguf: llama.cpp settings"),
        ({"name": "a", "backend": "ollama", "tag": "x:1", "extra_args": ["-v"]}, "extra_args: llama.cpp settings"),
        ({"name": "a", "backend": "ollama", "tag": "x:1", "context_size": 8192}, "runs with the server's context"),
        ({"name": "a", "tag": "x:1", "gguf": "m.gguf"}, "'tag' and 'pull' are for backend: ollama"),
        ({"name": "a"}, "a llamacpp model needs 'gguf'"),
        ({"name": "a", "backend": "ollama", "tag": "x:1", "memory": "lots"}, "'lots' is not a size"),
    ],
)
def test_catalog_entries_are_checked_per_backend(entry, problem):
    with pytest.raises(ValueError, match=problem):
        ModelEntry.model_validate(entry)


def test_ollama_env_may_not_override_what_localllm_sets():
    with pytest.raises(ValueError, match="OLLAMA_CONTEXT_LENGTH, OLLAMA_HOST: set by localllm"):
        config(env={"OLLAMA_HOST": "0.0.0.0:1", "OLLAMA_CONTEXT_LENGTH": "x"})


def test_two_entries_may_not_share_a_tag(tmp_path):
    from supervisor.config.settings import load_config

    path = tmp_path / "c.yaml"
    path.write_text(
        "profile: cpu-only\nmodels:\n  - {name: a, backend: ollama, tag: llama3}\n"
        "  - {name: b, backend: ollama, tag: 'llama3:latest'}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path}:4: models[1].tag: tag 'llama3:latest' is also models[0]'s: unloading one would unload the other"
    ]


def test_a_bad_ollama_entry_in_a_file_names_its_line(tmp_path):
    from supervisor.config.settings import load_config

    path = tmp_path / "c.yaml"
    path.write_text("profile: cpu-only\nmodels:\n  - name: a\n    backend: ollama\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path}:3: models[0]: an ollama model needs 'tag' (its name in Ollama, e.g. llama3.2:1b)"
    ]


@pytest.mark.parametrize(
    "text, size",
    [
        (1024, 1024),
        ("4GiB", 4 * 2**30),
        ("600MB", 600_000_000),
        ("1.5G", 1_500_000_000),
        ("512Mi", 512 * 2**20),
        ("12 KiB", 12 * 1024),
    ],
)
def test_sizes(text, size):
    assert parse_size(text) == size


def test_sizing_declared_learned_and_placeholder():
    profile = PROFILES["cpu-only"]
    entry = ModelEntry(name="q", backend="ollama", tag="qwen:1b")
    assert size_model(entry, profile).need == OLLAMA_PLACEHOLDER
    declared = ModelEntry(name="q", backend="ollama", tag="qwen:1b", memory="700MiB")
    assert size_model(declared, profile).need == 700 * 2**20

    class Learned:
        def get(self, key):
            launch = ollama.launch_settings(OllamaSettings(), profile)
            assert key == learned_key("qwen:1b", launch, "ollama/ollama")
            return 123_000_000

    assert size_model(entry, profile, Learned()).need == max(OLLAMA_PLACEHOLDER, 123_000_000)


SHOW = {
    "details": {"parameter_size": "1.2B", "quantization_level": "Q8_0", "family": "llama"},
    "model_info": {
        "general.architecture": "llama",
        "general.parameter_count": 1_235_814_432,
        "llama.block_count": 16,
        "llama.embedding_length": 2048,
        "llama.attention.head_count": 32,
        "llama.attention.head_count_kv": 8,
    },
}


def test_estimate_from_show_is_weights_plus_kv():
    weights = 1_235_814_432 * 8.5 / 8
    kv = 2 * 16 * (2048 * 8 / 32) * 4096 * 2
    assert estimate_from_show(SHOW, 4096) == int(weights + kv)
    no_count = {"details": {"parameter_size": "7B", "quantization_level": "Q4_K_M"}, "model_info": {}}
    assert estimate_from_show(no_count, 4096) == int(7e9 * 4.85 / 8)
    assert estimate_from_show({"details": {"parameter_size": "7B", "quantization_level": "WEIRD"}}, 4096) is None
    assert estimate_from_show({}, 4096) is None


@pytest.mark.parametrize(
    "name",
    [
        "tiny-a:1b",
        "Tiny-A:1B",
        "library/tiny-a:1b",
        "registry.ollama.ai/library/tiny-a:1b",
        "REGISTRY.ollama.ai/Library/tiny-a:1b",
        "https://registry.ollama.ai/library/tiny-a:1b",
    ],
)
def test_names_match_as_ollama_matches_them(name):
    """types/model/name.go: default host, namespace and tag, compared case-insensitively."""
    assert normal_tag(name) == "registry.ollama.ai/library/tiny-a:1b" and same_tag(name, "tiny-a:1b")


@pytest.mark.parametrize(
    "name, normal",
    [
        ("tiny-a", "registry.ollama.ai/library/tiny-a:latest"),
        ("team/x", "registry.ollama.ai/team/x:latest"),
        ("myhost:5000/team/x:1", "myhost:5000/team/x:1"),  # a port is not a tag
        ("myhost:5000/team/x", "myhost:5000/team/x:latest"),
        ("hf.co/Org/Model-GGUF:Q4_K_M", "hf.co/org/model-gguf:q4_k_m"),
    ],
)
def test_names_keep_what_they_say_and_default_the_rest(name, normal):
    assert normal_tag(name) == normal


def test_tags_and_ps_entries():
    assert same_tag("llama3", "llama3:latest") and not same_tag("llama3:8b", "llama3:70b")
    assert not same_tag("team/x:1", "x:1") and not same_tag("myhost:5000/team/x:1", "team/x:1")
    loaded = {"qwen:1b": {"size": 900, "size_vram": 0}, "llama3:latest": {"size": 5, "size_vram": 5}}
    assert find_loaded(loaded, "llama3") == {"size": 5, "size_vram": 5}
    assert find_loaded(loaded, "library/Qwen:1B") == {"size": 900, "size_vram": 0}
    assert find_loaded(loaded, "nope") is None
    assert memory_in_use(loaded["qwen:1b"], on_gpu=False) == 900
    assert memory_in_use(loaded["qwen:1b"], on_gpu=True) is None  # 0 on the GPU: unknown, not free
    assert Path(ollama.STORE) == Path(ollama.HOME) / ".ollama"  # Ollama keeps its key in $HOME/.ollama
