"""supervisor.config.profiles: the shipped profiles, loading extra ones, and closest_profile."""

from __future__ import annotations

import pytest

from supervisor.config.profiles import HostFacts, closest_profile, load_profiles
from supervisor.core.errors import ConfigError
from supervisor.runtime.images import cpu_image_tag


def profile_yaml(name: str, description: str = "", gpus: str = "[]") -> str:
    return (
        f"name: {name}\ndescription: '{description}'\n"
        f"hardware:\n  gpus: {gpus}\n  ram_gib: 16\n  cpu_cores: 4\n"
        "defaults:\n  images:\n    llamacpp: example/llama:1\n"
    )


@pytest.fixture(scope="module")
def shipped():
    return load_profiles()


@pytest.mark.parametrize(
    "name, vram_per_gpu",
    [
        ("cpu-only", []),
        ("gpu-1x8g", [8]),
        ("gpu-1x24g", [24]),
        ("gpu-2x24g", [24, 24]),
        ("gpu-1x80g", [80]),
    ],
)
def test_shipped_profile_has_the_gpus_its_name_says(shipped, name, vram_per_gpu):
    profile = shipped[name]
    assert profile.name == name
    assert [gpu.vram_gib for gpu in profile.hardware.gpus] == vram_per_gpu
    assert profile.has_gpus == bool(vram_per_gpu)
    assert profile.description != ""


def test_shipped_profiles_are_exactly_these(shipped):
    assert sorted(shipped) == ["cpu-only", "gpu-1x24g", "gpu-1x80g", "gpu-1x8g", "gpu-2x24g"]


def test_cpu_profile_uses_the_locally_built_image_and_no_gpu_layers(shipped):
    defaults = shipped["cpu-only"].defaults
    assert defaults.images.llamacpp == cpu_image_tag()
    assert defaults.gpu_layers == 0


@pytest.mark.parametrize(
    "vram, ram, expected",
    [
        ((), 16, "cpu-only"),
        ((), 512, "cpu-only"),
        ((8,), 32, "gpu-1x8g"),
        ((24,), 64, "gpu-1x24g"),
        ((24, 24), 128, "gpu-2x24g"),
        ((80,), 256, "gpu-1x80g"),
        ((16,), 32, "gpu-1x8g"),  # never a profile declaring more VRAM than present
        ((12,), 32, "gpu-1x8g"),
        ((48,), 64, "gpu-1x24g"),
        ((24, 24, 24, 24), 256, "gpu-2x24g"),
        ((23.98828125,), 64, "gpu-1x24g"),  # a 24564 MiB RTX 4090
        ((24,), 8, "gpu-1x24g"),  # RAM only breaks ties
        ((8,), 512, "gpu-1x8g"),
    ],
)
def test_closest_profile(shipped, vram, ram, expected):
    host = HostFacts(gpu_vram_gib=tuple(float(v) for v in vram), ram_gib=float(ram), cpu_cores=8, gpu_source="nvml")
    profile, reason = closest_profile(host, shipped)
    assert profile.name == expected
    assert f"closest profile is '{expected}' ({profile.description})" in reason
    assert reason.startswith(f"detected {host.describe()}; ")


def test_closest_profile_needs_profiles():
    with pytest.raises(ValueError, match="no profiles to choose from"):
        closest_profile(HostFacts((), 16.0, 4), {})


@pytest.mark.parametrize(
    "facts, text",
    [
        (HostFacts((24.0,), 64.0, 16, "nvml"), "1 GPU(s) with 24.0 GiB (via nvml), 64 GiB RAM, 16 CPU cores"),
        (
            HostFacts((23.98828125, 8.0), 31.6, 8, "nvidia-smi"),
            "2 GPU(s) with 24.0, 8.0 GiB (via nvidia-smi), 32 GiB RAM, 8 CPU cores",
        ),
        (HostFacts((), 16.0, 4), "no GPU (via none), 16 GiB RAM, 4 CPU cores"),
    ],
)
def test_host_facts_describe(facts, text):
    assert facts.describe() == text


def test_extra_dir_overrides_builtin_and_adds_profiles(tmp_path):
    (tmp_path / "cpu-only.yaml").write_text(profile_yaml("cpu-only", "my own cpu box"))
    (tmp_path / "lab-box.yaml").write_text(profile_yaml("lab-box", "lab", "[{vram_gib: 12}]"))
    (tmp_path / "notes.txt").write_text("not a profile")
    profiles = load_profiles(tmp_path)
    assert sorted(profiles) == ["cpu-only", "gpu-1x24g", "gpu-1x80g", "gpu-1x8g", "gpu-2x24g", "lab-box"]
    assert profiles["cpu-only"].description == "my own cpu box"
    assert profiles["cpu-only"].defaults.images.llamacpp == "example/llama:1"
    assert [g.vram_gib for g in profiles["lab-box"].hardware.gpus] == [12.0]
    assert profiles["gpu-1x8g"].description == load_profiles()["gpu-1x8g"].description


def test_profile_defaults(tmp_path):
    (tmp_path / "lab-box.yaml").write_text(profile_yaml("lab-box"))
    defaults = load_profiles(tmp_path)["lab-box"].defaults
    assert (defaults.context_size, defaults.gpu_layers, defaults.vram_reserve_gib, defaults.parallel) == (
        4096,
        0,
        0.0,
        1,
    )
    assert defaults.images.ollama == "ollama/ollama"


def test_profile_name_must_match_file_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(profile_yaml("other"))
    with pytest.raises(ConfigError) as caught:
        load_profiles(tmp_path)
    assert caught.value.problems == [f"{path}:1: name: 'other' must match the file name 'mine'"]


def test_invalid_profile_file_names_line_and_field(tmp_path):
    path = tmp_path / "lab-box.yaml"
    path.write_text(profile_yaml("lab-box").replace("ram_gib: 16", "ram_gib: 0"))
    with pytest.raises(ConfigError) as caught:
        load_profiles(tmp_path)
    assert caught.value.problems == [f"{path}:5: hardware.ram_gib: Input should be greater than 0 (got 0)"]


def test_missing_extra_dir_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_profiles(tmp_path / "nope")
    assert caught.value.problems == [f"{tmp_path / 'nope'}: profiles directory does not exist"]
