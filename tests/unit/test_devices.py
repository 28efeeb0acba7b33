"""supervisor.core.placement.devices_for: the memory budget of each device, declared or measured."""

from __future__ import annotations

import pytest

from supervisor.config.profiles import Profile, load_profiles
from supervisor.core.placement import Device, GpuReading, devices_for

GIB = 1024**3
MIB = 1024**2
BUILTIN = load_profiles()


def profile(gpus=(), ram=16.0, ram_reserve=0.0, vram_reserve=0.0) -> Profile:
    return Profile.model_validate(
        {
            "name": "test",
            "hardware": {"gpus": [{"vram_gib": v} for v in gpus], "ram_gib": ram, "cpu_cores": 4},
            "defaults": {
                "images": {"llamacpp": "img"},
                "ram_reserve_gib": ram_reserve,
                "vram_reserve_gib": vram_reserve,
            },
        }
    )


@pytest.mark.parametrize(
    "prof, budget",
    [
        (BUILTIN["cpu-only"], 15_032_385_536),  # 16 - 2 GiB
        (profile(ram=8, ram_reserve=0.5), 8_053_063_680),  # 7.5 GiB
        (profile(ram=12.5, ram_reserve=0.25), 13_153_337_344),  # 12.25 GiB
        (profile(ram=32), 34_359_738_368),  # no reserve
        (profile(ram=2, ram_reserve=4), 0),  # a reserve above the RAM leaves nothing, not less
    ],
)
def test_cpu_profile_is_one_cpu_device(prof, budget):
    assert devices_for(prof, None) == [Device("cpu", budget, None, None)]
    assert devices_for(prof, []) == [Device("cpu", budget)]


def test_cpu_profile_ignores_gpu_readings():
    readings = [GpuReading(0, "stray", 8 * GIB, 0, 8 * GIB)]
    assert devices_for(BUILTIN["cpu-only"], readings) == [Device("cpu", 14 * GIB)]


@pytest.mark.parametrize(
    "prof, expected",
    [
        (BUILTIN["gpu-1x24g"], [Device("gpu0", 24_696_061_952, None, 0)]),  # 24 - 1 GiB
        (BUILTIN["gpu-1x8g"], [Device("gpu0", 7_784_628_224, None, 0)]),  # 8 - 0.75 GiB
        (BUILTIN["gpu-1x80g"], [Device("gpu0", 83_751_862_272, None, 0)]),  # 80 - 2 GiB
        (BUILTIN["gpu-2x24g"], [Device("gpu0", 24_696_061_952, None, 0), Device("gpu1", 24_696_061_952, None, 1)]),
        (
            profile([12, 6, 10.5], vram_reserve=8),
            [Device("gpu0", 4 * GIB, None, 0), Device("gpu1", 0, None, 1), Device("gpu2", 2_684_354_560, None, 2)],
        ),  # 2.5 GiB
        (profile([16], vram_reserve=0), [Device("gpu0", 16 * GIB, None, 0)]),
    ],
)
def test_gpu_profile_without_readings_uses_declared_vram(prof, expected):
    assert devices_for(prof, None) == expected
    assert devices_for(prof, []) == expected  # no readings at all is the same as none


@pytest.mark.parametrize(
    "prof, readings, expected",
    [
        # recorded RTX 4090: 24564 MiB total, 23201 MiB free; reserve 1 GiB = 1024 MiB
        (
            BUILTIN["gpu-1x24g"],
            [GpuReading(0, "NVIDIA GeForce RTX 4090", 24564 * MIB, 1021 * MIB, 23201 * MIB)],
            [Device("gpu0", 24_683_479_040, 23_254_269_952, 0)],
        ),  # 23540 MiB, 22177 MiB
        # two 3090s, one half used by something else
        (
            BUILTIN["gpu-2x24g"],
            [
                GpuReading(0, "3090", 24576 * MIB, 517 * MIB, 23742 * MIB),
                GpuReading(1, "3090", 24576 * MIB, 12034 * MIB, 12225 * MIB),
            ],
            [Device("gpu0", 23552 * MIB, 22718 * MIB, 0), Device("gpu1", 23552 * MIB, 11201 * MIB, 1)],
        ),
        # free below the reserve: nothing measured free, never negative
        (
            profile([2], vram_reserve=1),
            [GpuReading(0, "small", 2 * GIB, 1800 * MIB, 248 * MIB)],
            [Device("gpu0", GIB, 0, 0)],
        ),
        # a total below the reserve: no budget either
        (profile([4], vram_reserve=6), [GpuReading(0, "tiny", 4 * GIB, 0, 4 * GIB)], [Device("gpu0", 0, 0, 0)]),
        # readings win over the declared GPUs, and keep their own indices
        (
            profile([24], vram_reserve=0.5),
            [GpuReading(0, "a", 8 * GIB, 0, 6 * GIB), GpuReading(3, "b", 12 * GIB, 0, GIB)],
            [Device("gpu0", 7.5 * GIB, 5.5 * GIB, 0), Device("gpu3", 11.5 * GIB, 0.5 * GIB, 3)],
        ),
    ],
)
def test_gpu_profile_with_readings_uses_measurements(prof, readings, expected):
    got = devices_for(prof, readings)
    assert got == expected
    assert all(isinstance(d.budget, int) and isinstance(d.measured_free, int) for d in got)


def test_driver_reserved_memory_is_not_in_the_budget_and_the_uuid_is_kept():
    reading = GpuReading(0, "H200", 140 * GIB, 2 * GIB, 137 * GIB, uuid="GPU-1234", reserved_bytes=GIB)
    [device] = devices_for(BUILTIN["gpu-1x80g"], [reading])  # reserve 2 GiB
    assert device == Device("gpu0", 137 * GIB, 135 * GIB, 0, "GPU-1234")


def test_a_gpu_whose_reading_failed_gets_no_budget_and_keeps_the_reason():
    readings = [
        GpuReading(0, "ok", 24 * GIB, 0, 24 * GIB, uuid="GPU-a"),
        GpuReading(1, "lost", 0, 0, 0, uuid="GPU-b", problem="memory info failed: NVML_ERROR_GPU_IS_LOST"),
    ]
    devices = devices_for(BUILTIN["gpu-2x24g"], readings)
    assert devices[1] == Device("gpu1", 0, 0, 1, "GPU-b", "memory info failed: NVML_ERROR_GPU_IS_LOST")
    assert devices[0].budget == 23 * GIB and devices[0].problem is None
