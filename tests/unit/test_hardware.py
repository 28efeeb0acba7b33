"""supervisor.hardware: parsing recorded nvidia-smi output and turning it into host facts."""

from __future__ import annotations

import pytest

from supervisor.hardware import MIB, GpuReading, facts_from, parse_nvidia_smi
from supervisor.profiles import GIB, HostFacts, closest_profile, load_profiles

RECORDED = {
    "nvidia-smi-1x-rtx4090.txt": [GpuReading(0, "NVIDIA GeForce RTX 4090", 24564 * MIB, 1021 * MIB, 23201 * MIB)],
    "nvidia-smi-2x-rtx3090.txt": [
        GpuReading(0, "NVIDIA GeForce RTX 3090", 24576 * MIB, 517 * MIB, 23742 * MIB),
        GpuReading(1, "NVIDIA GeForce RTX 3090", 24576 * MIB, 12034 * MIB, 12225 * MIB),
    ],
    "nvidia-smi-1x-a100-80gb.txt": [GpuReading(0, "NVIDIA A100-SXM4-80GB", 81920 * MIB, 4 * MIB, 81251 * MIB)],
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


def test_blank_lines_between_gpus_are_ignored():
    text = "\n0, GPU A, 1024, 1, 1023\n\n1, GPU B, 2048, 2, 2046\n"
    assert [(g.index, g.name, g.total_bytes) for g in parse_nvidia_smi(text)] == [(0, "GPU A", GIB), (1, "GPU B", 2 * GIB)]


@pytest.mark.parametrize("text", [
    "0, NVIDIA GeForce RTX 4090, 24564, 1021",            # a field short
    "0, NVIDIA GeForce RTX 4090, 24564, 1021, 23201, 7",  # a field too many
    "gpu0, NVIDIA GeForce RTX 4090, 24564, 1021, 23201",  # index not a number
    "0, NVIDIA GeForce RTX 4090, [N/A], 1021, 23201",     # memory not a number
    "0, NVIDIA A100-SXM4-80GB, 81920, 4, 81251\nNo devices were found",
])
def test_malformed_output_raises_value_error(text):
    with pytest.raises(ValueError):
        parse_nvidia_smi(text)


@pytest.mark.parametrize("name, ram_gib, vram, expected", [
    ("nvidia-smi-1x-rtx4090.txt", 64, (24564 / 1024,), "gpu-1x24g"),
    ("nvidia-smi-2x-rtx3090.txt", 128, (24.0, 24.0), "gpu-2x24g"),
    ("nvidia-smi-1x-a100-80gb.txt", 256, (80.0,), "gpu-1x80g"),
])
def test_recorded_gpus_pick_their_profile(fixture_text, name, ram_gib, vram, expected):
    facts = facts_from(parse_nvidia_smi(fixture_text(name)), "nvidia-smi", ram_gib * GIB, 16)
    assert facts == HostFacts(gpu_vram_gib=vram, ram_gib=float(ram_gib), cpu_cores=16, gpu_source="nvidia-smi")
    assert closest_profile(facts, load_profiles())[0].name == expected


@pytest.mark.parametrize("readings", [None, []])
def test_no_readings_mean_no_gpu_source(readings):
    facts = facts_from(readings, "nvml", 8 * GIB, 2)
    assert facts == HostFacts(gpu_vram_gib=(), ram_gib=8.0, cpu_cores=2, gpu_source="none")
    assert closest_profile(facts, load_profiles())[0].name == "cpu-only"



@pytest.mark.parametrize("processes, pids, expected", [
    ([], {1}, 0),
    ([(1, 100 * MIB)], set(), 0),
    ([(1, 100 * MIB)], {1}, 100 * MIB),
    ([(1, 100), (2, 200), (3, 400)], {1, 3}, 500),      # only the matching pids
    ([(1, 100), (2, 200), (3, 400)], {9}, 0),            # none of ours on the GPU
    ([(1, 100), (2, 200), (1, 50)], {1}, 150),           # one process on two GPUs: both count
    ([(7, 0), (8, 300)], {7, 8, 9}, 300),                # NVML may report 0 used
    ([(10, 5 * GIB), (11, 3 * GIB), (12, GIB)], {10, 12}, 6 * GIB),
])
def test_memory_of_sums_the_matching_pids(processes, pids, expected):
    from supervisor.hardware import memory_of

    assert memory_of(processes, pids) == expected
