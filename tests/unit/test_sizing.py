"""supervisor.fleet.sizing: what a catalog model is admitted with, from a real tiny GGUF file."""

from __future__ import annotations

import pytest

from supervisor.config.profiles import load_profiles
from supervisor.config.settings import ModelEntry
from supervisor.core.estimate import Estimate, LaunchSettings
from supervisor.fleet.sizing import size_model
from supervisor.runtime.tinygguf import write_tiny_model
from supervisor.state.learned import LearnedSizes, learned_key

PROFILES = load_profiles()
CPU = PROFILES["cpu-only"]
GPU = PROFILES["gpu-1x24g"]

# The default tiny model: 2 blocks, embedding 64, 4 heads, 2 KV heads of 16, feed-forward 128, vocab 311.
# Tensor bytes: blocks 147_968 each, token_embd 79_616, output norm and head 79_872.
# cpu-only: context 4096, 1 slot, f16 cache, on the CPU.
#   KV 4096 × 2 layers × 2 heads × (16 × 2 + 16 × 2) = 1_048_576
#   compute: mask 4096 × 512 × 2 = 4_194_304 + feed-forward 4 × 512 × (128 + 3.5 × 128) = 1_179_648
#   outputs: the logits buffer, 311 tokens × 1 slot × 4 = 1_244
CPU_ESTIMATE = Estimate(
    weights=455_424,
    kv_cache=1_048_576,
    compute=5_373_952,
    overhead=0,
    offloaded_layers=0,
    total_layers=2,
    outputs=1_244,
)
# gpu-1x24g: context 16384, 2 slots, every layer (999) on the GPU.
#   weights 2 × 147_968 + 79_872 (no token_embd) = 375_808; KV 16384 × 2 × 2 × 64 = 4_194_304
#   compute: mask 8192 × 512 × 2 = 8_388_608 + 1_179_648; overhead 450 MiB
GPU_ESTIMATE = Estimate(
    weights=375_808, kv_cache=4_194_304, compute=9_568_256, overhead=471_859_200, offloaded_layers=2, total_layers=2
)


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_model(tmp_path / "models" / "tiny.gguf")


def entry(path, **fields) -> ModelEntry:
    return ModelEntry(name="tiny", gguf=path, **fields)


@pytest.mark.parametrize(
    "profile, launch, expected, total",
    [
        (CPU, LaunchSettings(context=4096, gpu_layers=0, on_gpu=False), CPU_ESTIMATE, 6_879_196),
        (GPU, LaunchSettings(context=16384, parallel=2, gpu_layers=999, on_gpu=True), GPU_ESTIMATE, 485_997_568),
    ],
)
def test_need_is_the_estimate(tiny, profile, launch, expected, total):
    sizing = size_model(entry(tiny), profile)
    assert sizing.launch == launch
    assert sizing.estimate == expected
    assert sizing.need == sizing.estimate.total == total
    assert (sizing.learned, sizing.problem) == (None, None)
    assert sizing.learned_key == learned_key(tiny, launch, profile.defaults.images.llamacpp)


def test_model_settings_reach_the_estimate(tiny):
    # context 1024, q8_0 cache: KV 1024 × 2 × 2 × 16 × (34/32 × 2) = 139_264; mask 1024 × 512 × 2 = 1_048_576
    sizing = size_model(entry(tiny, context_size=1024, cache_type_k="q8_0", cache_type_v="q8_0"), CPU)
    assert sizing.estimate == Estimate(
        455_424, 139_264, 1_048_576 + 1_179_648, 0, 0, 2, outputs=1_244
    )  # 311 tokens × 1 slot × f32


def test_learned_larger_than_the_estimate_wins(tiny, tmp_path):
    learned = LearnedSizes(tmp_path / "learned.json")
    key = learned_key(tiny, LaunchSettings(context=4096, gpu_layers=0), CPU.defaults.images.llamacpp)
    learned.record(key, 50_000_000, "tiny")
    sizing = size_model(entry(tiny), CPU, learned)
    assert (sizing.learned, sizing.learned_key) == (50_000_000, key)
    assert sizing.estimate == CPU_ESTIMATE
    assert sizing.need == 50_000_000


def test_learned_smaller_than_the_estimate_does_not_lower_it(tiny, tmp_path):
    learned = LearnedSizes(tmp_path / "learned.json")
    learned.record(
        learned_key(tiny, LaunchSettings(context=4096, gpu_layers=0), CPU.defaults.images.llamacpp), 1_000, "tiny"
    )
    sizing = size_model(entry(tiny), CPU, learned)
    assert sizing.learned == 1_000
    assert sizing.need == 6_879_196


def test_learned_for_other_settings_is_not_used(tiny, tmp_path):
    learned = LearnedSizes(tmp_path / "learned.json")
    learned.record(
        learned_key(tiny, LaunchSettings(context=8192, gpu_layers=0), CPU.defaults.images.llamacpp), 50_000_000, "tiny"
    )
    sizing = size_model(entry(tiny), CPU, learned)
    assert sizing.learned is None
    assert sizing.need == 6_879_196


@pytest.mark.parametrize(
    "content",
    [
        b"definitely not a model\n" * 37,
        b"\x00" * 4096,
        b"GGUF",  # the magic alone
    ],
    ids=["text", "zeros", "magic-only"],
)
def test_unreadable_file_falls_back_to_its_size(tmp_path, content):
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    learned = LearnedSizes(tmp_path / "learned.json")
    sizing = size_model(entry(path), CPU, learned)
    assert sizing.estimate is None
    assert (sizing.learned, sizing.learned_key) == (None, None)
    assert sizing.problem is not None and str(path) in sizing.problem
    assert sizing.fallback == len(content)
    assert sizing.need == len(content)
    assert sizing.launch == LaunchSettings(context=4096, gpu_layers=0)


def test_missing_file_needs_nothing_known(tmp_path):
    path = tmp_path / "absent.gguf"
    sizing = size_model(entry(path), CPU)
    assert sizing.estimate is None
    assert sizing.problem is not None and str(path) in sizing.problem
    assert (sizing.fallback, sizing.need) == (0, 0)
