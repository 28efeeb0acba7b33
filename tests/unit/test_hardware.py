"""supervisor.runtime.hardware: parsing recorded nvidia-smi output, NVML errors, and turning readings into host facts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from supervisor.config.profiles import GIB, HostFacts, closest_profile, load_profiles
from supervisor.runtime import hardware
from supervisor.runtime.hardware import (
    MIB,
    NVIDIA_SMI_FIELDS_LEGACY,
    NVIDIA_SMI_QUERY,
    GpuReading,
    detect_host,
    facts_from,
    parse_nvidia_smi,
    select_profile,
)
from supervisor.runtime.nvml import Nvml

from .fake_nvml import FakeDevice, FakeNvml

UUID_4090 = "GPU-5c2d8a4f-1e7b-93c6-0a4d-b8f2e61c7d39"
UUID_3090 = ("GPU-8e41b0c2-7d3a-4f95-e216-3ac9d05b7f18", "GPU-f07a3d96-22c8-1be4-5d0f-96e18b4c2a75")
UUID_A100 = "GPU-2b9e6f13-c480-7a5d-d1e2-64f0a83b95c7"
UUID_GB10 = "GPU-a3f1c9e7-4b28-d06e-7c15-e9b4d2068f3a"
LOST = (
    "nvidia-smi could not read it: memory.total is [GPU is lost], memory.used is [GPU is lost], "
    "memory.free is [GPU is lost]"
)

RECORDED = {
    "nvidia-smi-1x-rtx4090.txt": [
        GpuReading(0, "NVIDIA GeForce RTX 4090", 24564 * MIB, 1021 * MIB, 23201 * MIB, UUID_4090, 342 * MIB)
    ],
    "nvidia-smi-2x-rtx3090.txt": [
        GpuReading(0, "NVIDIA GeForce RTX 3090", 24576 * MIB, 517 * MIB, 23742 * MIB, UUID_3090[0], 317 * MIB),
        GpuReading(1, "NVIDIA GeForce RTX 3090", 24576 * MIB, 12034 * MIB, 12225 * MIB, UUID_3090[1], 317 * MIB),
    ],
    "nvidia-smi-1x-a100-80gb.txt": [
        GpuReading(0, "NVIDIA A100-SXM4-80GB", 81920 * MIB, 4 * MIB, 81251 * MIB, UUID_A100, 665 * MIB)
    ],
    "nvidia-smi-1x-gb10.txt": [  # DGX Spark: unified memory, which nvidia-smi does not report per GPU
        GpuReading(
            0,
            "NVIDIA GB10",
            0,
            0,
            0,
            UUID_GB10,
            problem="nvidia-smi could not read it: memory.total is [N/A], memory.used is [N/A], memory.free is [N/A]",
        )
    ],
    "nvidia-smi-2x-rtx3090-one-lost.txt": [
        GpuReading(0, "NVIDIA GeForce RTX 3090", 24576 * MIB, 517 * MIB, 23742 * MIB, UUID_3090[0], 317 * MIB),
        GpuReading(1, "NVIDIA GeForce RTX 3090", 0, 0, 0, UUID_3090[1], problem=LOST),
    ],
}


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_parse_recorded_output(fixture_text, name):
    assert parse_nvidia_smi(fixture_text(name)) == RECORDED[name]


def test_values_are_mib_converted_to_bytes(fixture_text):
    (gpu,) = parse_nvidia_smi(fixture_text("nvidia-smi-1x-rtx4090.txt"))
    assert gpu.total_bytes == 25_757_220_864
    assert gpu.free_bytes == 23201 * 1024 * 1024


@pytest.mark.parametrize("text", ["", "\n", "  \n\n"])
def test_empty_output_means_no_gpus(text):
    assert parse_nvidia_smi(text) == []


def test_the_query_asks_for_uuid_and_reserved_memory():
    assert NVIDIA_SMI_QUERY == [
        "nvidia-smi",
        "--query-gpu=index,uuid,name,memory.total,memory.used,memory.free,memory.reserved",
        "--format=csv,noheader,nounits",
    ]


def test_blank_lines_between_gpus_are_ignored():
    text = "\n0, GPU-a, GPU A, 1024, 1, 1023, 0\n\n1, GPU-b, GPU B, 2048, 2, 2046, 0\n"
    assert [(g.index, g.name, g.total_bytes) for g in parse_nvidia_smi(text)] == [
        (0, "GPU A", GIB),
        (1, "GPU B", 2 * GIB),
    ]


@pytest.mark.parametrize(
    "value", ["[N/A]", "[Not Supported]", "[Unknown Error]", "[GPU is lost]", "[Insufficient Permissions]"]
)
@pytest.mark.parametrize("field", ["uuid", "name", "memory.total", "memory.used", "memory.free"])
def test_an_unreadable_field_marks_that_gpu_and_keeps_the_other(field, value):
    good = ["0", "GPU-a", "GPU A", "24576", "517", "23742", "317"]
    bad = ["1", "GPU-b", "GPU B", "24576", "12034", "12225", "317"]
    bad[hardware.NVIDIA_SMI_FIELDS.index(field)] = value
    first, second = parse_nvidia_smi(", ".join(good) + "\n" + ", ".join(bad) + "\n")
    assert first.problem is None and first.total_bytes == 24576 * MIB
    assert second.index == 1
    assert second.problem == f"nvidia-smi could not read it: {field} is {value}"
    assert (second.total_bytes, second.used_bytes, second.free_bytes) == (0, 0, 0)


def test_unreadable_reserved_memory_alone_leaves_the_gpu_usable():
    (gpu,) = parse_nvidia_smi("0, GPU-a, GPU A, 24576, 517, 23742, [N/A]\n")
    assert gpu.problem is None and gpu.reserved_bytes == 0 and gpu.free_bytes == 23742 * MIB


def test_legacy_fields_without_reserved_memory():
    (gpu,) = parse_nvidia_smi("0, GPU-a, GPU A, 24576, 517, 23742\n", NVIDIA_SMI_FIELDS_LEGACY)
    assert gpu == GpuReading(0, "GPU A", 24576 * MIB, 517 * MIB, 23742 * MIB, "GPU-a", 0)


@pytest.mark.parametrize(
    "text",
    [
        "0, GPU-a, NVIDIA GeForce RTX 4090, 24564, 1021, 23201",  # a field short
        "0, GPU-a, NVIDIA GeForce RTX 4090, 24564, 1021, 23201, 342, 7",  # a field too many
        "0, NVIDIA GeForce RTX 4090, 24564, 1021, 23201",  # the old query's output
        "gpu0, GPU-a, NVIDIA GeForce RTX 4090, 24564, 1021, 23201, 342",  # index not a number
        "[N/A], GPU-a, NVIDIA GeForce RTX 4090, 24564, 1021, 23201, 342",  # no index: cannot say which GPU
        "0, GPU-a, NVIDIA GeForce RTX 4090, lots, 1021, 23201, 342",  # memory neither a number nor [...]
        "0, GPU-a, NVIDIA A100-SXM4-80GB, 81920, 4, 81251, 665\nNo devices were found",
    ],
)
def test_malformed_output_raises_value_error(text):
    with pytest.raises(ValueError):
        parse_nvidia_smi(text)


@pytest.mark.parametrize(
    "name, ram_gib, vram, unusable, expected",
    [
        ("nvidia-smi-1x-rtx4090.txt", 64, (24564 / 1024,), (), "gpu-1x24g"),
        ("nvidia-smi-2x-rtx3090.txt", 128, (24.0, 24.0), (), "gpu-2x24g"),
        ("nvidia-smi-1x-a100-80gb.txt", 256, (80.0,), (), "gpu-1x80g"),
        ("nvidia-smi-2x-rtx3090-one-lost.txt", 128, (24.0,), (f"GPU 1 ({UUID_3090[1]}): {LOST}",), "gpu-1x24g"),
        (
            "nvidia-smi-1x-gb10.txt",
            128,
            (),
            (
                f"GPU 0 ({UUID_GB10}): nvidia-smi could not read it: memory.total is "
                "[N/A], memory.used is [N/A], memory.free is [N/A]",
            ),
            "cpu-only",
        ),
    ],
)
def test_recorded_gpus_pick_their_profile(fixture_text, name, ram_gib, vram, unusable, expected):
    facts = facts_from(parse_nvidia_smi(fixture_text(name)), "nvidia-smi", ram_gib * GIB, 16)
    assert facts == HostFacts(
        gpu_vram_gib=vram, ram_gib=float(ram_gib), cpu_cores=16, gpu_source="nvidia-smi", unusable_gpus=unusable
    )
    profile, reason = closest_profile(facts, load_profiles())
    assert profile.name == expected
    for gpu in unusable:
        assert gpu in reason


def test_unusable_gpus_are_described():
    lost = HostFacts((24.0,), 64.0, 16, "nvml", ("GPU 1 (GPU-b): memory info failed: NVML_ERROR_GPU_IS_LOST",))
    assert lost.describe() == (
        "1 GPU(s) with 24.0 GiB (via nvml), 64 GiB RAM, 16 CPU cores "
        "(not counted: GPU 1 (GPU-b): memory info failed: NVML_ERROR_GPU_IS_LOST)"
    )
    none = HostFacts((), 64.0, 16, "nvml", ("GPU 0: a", "GPU 1: b"))
    assert none.describe() == "no usable GPU (via nvml), 64 GiB RAM, 16 CPU cores (not counted: GPU 0: a; GPU 1: b)"


def test_an_unusable_gpu_without_uuid_is_named_by_index():
    facts = facts_from(
        [GpuReading(3, "", 0, 0, 0, problem="device handle failed: NVML_ERROR_GPU_IS_LOST")], "nvml", 8 * GIB, 2
    )
    assert facts.unusable_gpus == ("GPU 3: device handle failed: NVML_ERROR_GPU_IS_LOST",)
    assert facts.gpu_vram_gib == () and facts.gpu_source == "nvml"


# -- detection through NVML: per-device errors never stop it


def two_24g_gpus(**fail_on_second) -> FakeNvml:
    return FakeNvml(
        FakeDevice(uuid=UUID_3090[0], total=24 * GIB),
        FakeDevice(uuid=UUID_3090[1], total=24 * GIB, fail=dict(fail_on_second)),
    )


@pytest.mark.parametrize(
    "fail, problem",
    [
        ({"memory": FakeNvml.NVML_ERROR_NOT_SUPPORTED}, "memory info failed: NVML_ERROR_NOT_SUPPORTED"),
        ({"memory": FakeNvml.NVML_ERROR_GPU_IS_LOST}, "memory info failed: NVML_ERROR_GPU_IS_LOST"),
    ],
)
def test_detect_host_counts_only_usable_gpus_and_names_the_other(fail, problem):
    nvml = Nvml.open(module=two_24g_gpus(**fail))
    facts = detect_host(nvml=nvml)
    assert facts.gpu_vram_gib == (24.0,)
    assert facts.gpu_source == "nvml"
    assert facts.unusable_gpus == (f"GPU 1 ({UUID_3090[1]}): {problem}",)
    profile, reason = select_profile("auto", nvml=nvml)
    assert len(profile.hardware.gpus) == 1
    assert f"GPU 1 ({UUID_3090[1]}): {problem}" in reason


def test_select_profile_with_every_gpu_unusable_picks_cpu_only_and_says_why():
    fake = FakeNvml(FakeDevice(uuid=UUID_GB10, fail={"memory": FakeNvml.NVML_ERROR_NOT_SUPPORTED}))
    profile, reason = select_profile("auto", nvml=Nvml.open(module=fake))
    assert profile.name == "cpu-only"
    assert "no usable GPU (via nvml)" in reason
    assert f"GPU 0 ({UUID_GB10}): memory info failed: NVML_ERROR_NOT_SUPPORTED" in reason


def test_detect_host_with_its_own_session_opens_and_closes_it(monkeypatch):
    fake = two_24g_gpus(handle=FakeNvml.NVML_ERROR_GPU_IS_LOST)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    facts = detect_host()
    assert facts.gpu_vram_gib == (24.0,)
    assert facts.unusable_gpus == ("GPU 1: device handle failed: NVML_ERROR_GPU_IS_LOST",)
    assert (fake.calls["nvmlInit"], fake.calls["nvmlShutdown"]) == (1, 1)


def test_detect_host_falls_back_to_nvidia_smi_without_nvml(monkeypatch, fixture_text):
    monkeypatch.setattr(hardware, "read_gpus_nvml", lambda: None)
    monkeypatch.setattr(
        hardware, "read_gpus_nvidia_smi", lambda: parse_nvidia_smi(fixture_text("nvidia-smi-2x-rtx3090-one-lost.txt"))
    )
    facts = detect_host()
    assert facts.gpu_source == "nvidia-smi" and facts.gpu_vram_gib == (24.0,) and len(facts.unusable_gpus) == 1


# -- running nvidia-smi


def test_an_older_nvidia_smi_is_asked_again_without_reserved_memory(monkeypatch):
    asked = []

    def run(command, **kwargs):
        asked.append(command[1])
        if "memory.reserved" in command[1]:
            raise subprocess.CalledProcessError(2, command, 'Field "memory.reserved" is not a valid field to query.')
        return subprocess.CompletedProcess(command, 0, "0, GPU-a, GPU A, 1024, 1, 1023\n", "")

    monkeypatch.setattr(hardware.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(hardware.subprocess, "run", run)
    assert hardware.read_gpus_nvidia_smi() == [GpuReading(0, "GPU A", GIB, MIB, 1023 * MIB, "GPU-a")]
    assert asked == [
        "--query-gpu=index,uuid,name,memory.total,memory.used,memory.free,memory.reserved",
        "--query-gpu=index,uuid,name,memory.total,memory.used,memory.free",
    ]


@pytest.mark.parametrize(
    "outcome",
    [
        subprocess.TimeoutExpired("nvidia-smi", 10),
        OSError("exec format error"),
        subprocess.CompletedProcess([], 0, "No devices were found\n", ""),
    ],
)
def test_nvidia_smi_that_fails_otherwise_means_no_reading(monkeypatch, outcome):
    def run(command, **kwargs):
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(hardware.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(hardware.subprocess, "run", run)
    assert hardware.read_gpus_nvidia_smi() is None


@pytest.mark.parametrize("readings", [None, []])
def test_no_readings_mean_no_gpu_source(readings):
    facts = facts_from(readings, "nvml", 8 * GIB, 2)
    assert facts == HostFacts(gpu_vram_gib=(), ram_gib=8.0, cpu_cores=2, gpu_source="none")
    assert closest_profile(facts, load_profiles())[0].name == "cpu-only"
