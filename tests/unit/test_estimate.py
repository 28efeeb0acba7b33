"""supervisor.core.estimate: memory a model needs, checked against numbers worked out by hand.

FACTS below has 4 layers with different tensor bytes (so "the last k layers"
is visible) and KV heads (4, 4, 2, 2), key and value length 32: one context
cell costs Σ heads_kv × 32 × (k + v) = 12 × 32 × (k + v) = 384 × (k + v) bytes,
that is 1536 bytes in f16, split per layer 512, 512, 256, 256.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.core.backends.llamacpp import reported_buffers
from supervisor.core.estimate import (
    GPU_RUNTIME_OVERHEAD,
    MIB,
    Estimate,
    LaunchSettings,
    estimate,
)
from supervisor.core.gguf_facts import GgufFacts

FACTS = GgufFacts(
    architecture="llama",
    block_count=4,
    embedding=256,
    feed_forward=1024,
    head_count=8,
    head_count_kv=(4, 4, 2, 2),
    key_length=32,
    value_length=32,
    vocab_size=1000,
    context_train=4096,
    sliding_window=0,
    swa_layers=(False,) * 4,
    layer_bytes=(1000, 2000, 3000, 4000),
    input_bytes=500,
    output_bytes=700,
)
# Layers 0 and 2 use a 100-token sliding window; 1 and 3 attend over the whole context.
SWA = replace(FACTS, sliding_window=100, swa_layers=(True, False, True, False))

# context 1024, ubatch 512, flash attention: mask 1024 × 512 × 2 = 1_048_576;
# feed-forward 4 × 512 × (2 × 256 + 3.5 × 1024) = 2048 × 4096 = 8_388_608;
# logits 2048 × 256 + 4 × 1 × 1000 = 528_288, smaller; compute = 9_437_184.
COMPUTE_1024 = 9_437_184
KV_1024_F16 = 1024 * 1536  # 1_572_864


def test_overhead_constant():
    assert GPU_RUNTIME_OVERHEAD == 450 * 1024 * 1024 == 471_859_200
    assert MIB == 1_048_576


def test_cpu_holds_every_tensor_and_no_overhead():
    got = estimate(FACTS, LaunchSettings(context=1024))
    # outputs: the logits buffer, 1000 tokens × 1 slot × 4 bytes
    assert got == Estimate(
        weights=11_200,
        kv_cache=KV_1024_F16,
        compute=COMPUTE_1024,
        overhead=0,
        offloaded_layers=0,
        total_layers=4,
        output_head=0,
        outputs=4_000,
    )
    assert got.total == 11_200 + 1_572_864 + 9_437_184 + 4_000 + 0 == 11_025_248


def test_cpu_ignores_gpu_layers():
    assert estimate(FACTS, LaunchSettings(context=1024, gpu_layers=2)) == estimate(FACTS, LaunchSettings(context=1024))


@pytest.mark.parametrize(
    "cache_k, cache_v, kv",
    [
        ("f16", "f16", 1_572_864),  # 1024 × 384 × (2 + 2)
        ("q8_0", "q8_0", 835_584),  # 1024 × 384 × (34/32 + 34/32) = 1024 × 816
        ("q4_0", "q4_0", 442_368),  # 1024 × 384 × (18/32 + 18/32) = 1024 × 432
        ("f32", "f32", 3_145_728),  # 1024 × 384 × (4 + 4)
        ("q8_0", "q4_0", 638_976),  # 1024 × 384 × (34/32 + 18/32) = 1024 × 624
        ("f32", "f16", 2_359_296),  # 1024 × 384 × (4 + 2)
    ],
)
def test_kv_cache_by_cache_type(cache_k, cache_v, kv):
    got = estimate(FACTS, LaunchSettings(context=1024, cache_type_k=cache_k, cache_type_v=cache_v))
    assert got.kv_cache == kv
    assert got.compute == COMPUTE_1024  # the cache type does not change the graph


@pytest.mark.parametrize(
    "facts, launch, kv, compute",
    [
        # ubatch is min(512, context): 256 here. mask 256 × 256 × 2 = 131_072; ff 4 × 256 × 4096 = 4_194_304.
        (FACTS, LaunchSettings(context=256), 256 * 1536, 131_072 + 4_194_304),
        # without flash attention an f32 mask 1024 × 512 × 4 = 2_097_152, and the larger of ff and the scores,
        # 1024 × 512 × 4 × 8 heads = 16_777_216, plus Q, K, V and the residual, 5.5 × 2048 × 256 = 2_883_584.
        (FACTS, LaunchSettings(context=1024, flash_attention=False), KV_1024_F16, 2_097_152 + 16_777_216 + 2_883_584),
        # 4 slots share the context: KV unchanged; mask over a slot's share: 256 × 512 × 2 = 262_144.
        (FACTS, LaunchSettings(context=1024, parallel=4), KV_1024_F16, 262_144 + 8_388_608),
        # 4 slots without flash attention: mask 256 × 512 × 4 = 524_288; scores 256 × 512 × 4 × 8 + 2_883_584
        # = 7_077_888 are less than ff.
        (FACTS, LaunchSettings(context=1024, parallel=4, flash_attention=False), KV_1024_F16, 524_288 + 8_388_608),
        # ff 4 × 512 × (512 + 3.5 × 64) = 1_507_328 < logits 2048 × 256 + 4 × 300_000 = 1_724_288.
        (
            replace(FACTS, feed_forward=64, vocab_size=300_000),
            LaunchSettings(context=1024),
            KV_1024_F16,
            1_048_576 + 1_724_288,
        ),
        # logits grow with the slots: 524_288 + 4 × 4 × 300_000 = 5_324_288; mask 262_144.
        (
            replace(FACTS, feed_forward=64, vocab_size=300_000),
            LaunchSettings(context=1024, parallel=4),
            KV_1024_F16,
            262_144 + 5_324_288,
        ),
    ],
)
def test_kv_and_compute(facts, launch, kv, compute):
    got = estimate(facts, launch)
    assert (got.kv_cache, got.compute) == (kv, compute)


@pytest.mark.parametrize(
    "launch, kv",
    [
        # window 100 + ubatch 512 = 612, padded to 768 < 4096: SWA layers hold 768 cells, full ones 4096.
        (LaunchSettings(context=4096), 3_735_552),  # 768 × (512 + 256) + 4096 × (512 + 256)
        # 4 slots: each SWA slot min(1024, 768) = 768, 3072 cells in all; full layers still 4096.
        (LaunchSettings(context=4096, parallel=4), 5_505_024),  # 3072 × 768 + 4096 × 768
        # 8 slots: a slot's share 512 < 768, so SWA layers hold 8 × 512 = 4096, as many as full ones.
        (LaunchSettings(context=4096, parallel=8), 6_291_456),  # 4096 × 1536
        # context 256: ubatch 256, window + ubatch = 356 -> 512 > 256: the whole context.
        (LaunchSettings(context=256), 393_216),  # 256 × 1536
        # q8_0 cache on the first case: per-layer widths 272, 272, 136, 136.
        (LaunchSettings(context=4096, cache_type_k="q8_0", cache_type_v="q8_0"), 1_984_512),  # (768 + 4096) × 408
    ],
)
def test_sliding_window_layers(launch, kv):
    assert estimate(SWA, launch).kv_cache == kv


def test_window_plus_ubatch_on_a_pad_boundary_is_not_padded_further():
    # 256 + 512 = 768 exactly: 768 cells, not 1024.
    got = estimate(replace(SWA, sliding_window=256), LaunchSettings(context=4096))
    assert got.kv_cache == 768 * 768 + 4096 * 768


def test_full_attention_layers_ignore_slots():
    one = estimate(FACTS, LaunchSettings(context=4096, parallel=1)).kv_cache
    eight = estimate(FACTS, LaunchSettings(context=4096, parallel=8)).kv_cache
    assert one == eight == 4096 * 1536


# -ngl N puts the output layer (head 700) and the last N - 1 blocks on the GPU (llama-model.cpp: load_tensors).
@pytest.mark.parametrize(
    "gpu_layers, weights, kv, offloaded",
    [
        (-1, 10_000 + 700, KV_1024_F16, 4),  # every layer and the output head, never token_embd (500)
        (5, 10_000 + 700, KV_1024_F16, 4),  # blocks + 1: the same
        (99, 10_000 + 700, KV_1024_F16, 4),
        (4, 2000 + 3000 + 4000 + 700, 1024 * (512 + 256 + 256), 3),  # the head takes one of the four
        (2, 4000 + 700, 1024 * 256, 1),  # the head and the last layer
        (1, 700, 0, 0),  # the head alone
        (3, 3000 + 4000 + 700, 1024 * (256 + 256), 2),
    ],
)
def test_gpu_offload(gpu_layers, weights, kv, offloaded):
    got = estimate(FACTS, LaunchSettings(context=1024, gpu_layers=gpu_layers, on_gpu=True))
    assert got == Estimate(
        weights=weights,
        kv_cache=kv,
        compute=COMPUTE_1024,
        overhead=471_859_200,
        offloaded_layers=offloaded,
        total_layers=4,
    )
    assert got.total == weights + kv + COMPUTE_1024 + 471_859_200


def test_no_gpu_layers_means_nothing_on_the_gpu_but_the_runtime():
    got = estimate(FACTS, LaunchSettings(context=1024, gpu_layers=0, on_gpu=True))
    assert (got.weights, got.kv_cache, got.compute, got.outputs, got.total) == (0, 0, 0, 0, GPU_RUNTIME_OVERHEAD)


def test_gpu_offload_of_sliding_window_layers_counts_their_window():
    # -ngl 3: the head and the last two layers: layer 2 (SWA, 256 per cell, 768 cells) and layer 3
    # (full, 256 per cell, 4096 cells)
    got = estimate(SWA, LaunchSettings(context=4096, gpu_layers=3, on_gpu=True))
    assert got.kv_cache == 768 * 256 + 4096 * 256


@pytest.mark.parametrize(
    "launch",
    [
        LaunchSettings(context=1024),
        LaunchSettings(context=300, parallel=3, cache_type_k="q4_0"),
        LaunchSettings(context=8192, gpu_layers=2, on_gpu=True),
        LaunchSettings(context=512, on_gpu=True),
    ],
)
def test_total_is_the_sum_of_the_parts(launch):
    got = estimate(SWA, launch)
    parts = got.as_dict()
    assert got.total == got.weights + got.kv_cache + got.compute + got.outputs + got.overhead
    assert parts["total"] == (
        parts["weights"] + parts["kv_cache"] + parts["compute"] + parts["outputs"] + parts["overhead"]
    )
    assert parts["output_head"] <= parts["weights"]
    assert (parts["offloaded_layers"], parts["total_layers"]) == (got.offloaded_layers, 4)


CACHE = st.sampled_from(["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"])


@settings(max_examples=300, deadline=None)
@given(
    facts=st.sampled_from([FACTS, SWA, replace(SWA, sliding_window=4000)]),
    contexts=st.lists(st.integers(1, 1 << 18), min_size=2, max_size=2).map(sorted),
    parallel=st.integers(1, 8),
    cache_k=CACHE,
    cache_v=CACHE,
    flash=st.booleans(),
    on_gpu=st.booleans(),
    gpu_layers=st.integers(-1, 6),
)
def test_estimate_never_shrinks_as_the_context_grows(
    facts, contexts, parallel, cache_k, cache_v, flash, on_gpu, gpu_layers
):
    small, large = (
        estimate(
            facts,
            LaunchSettings(
                context=c,
                parallel=parallel,
                cache_type_k=cache_k,
                cache_type_v=cache_v,
                gpu_layers=gpu_layers,
                on_gpu=on_gpu,
                flash_attention=flash,
            ),
        )
        for c in contexts
    )
    assert small.kv_cache <= large.kv_cache
    assert small.compute <= large.compute
    assert small.total <= large.total


@settings(max_examples=200, deadline=None)
@given(
    facts=st.sampled_from([FACTS, SWA]),
    context=st.integers(1, 1 << 16),
    parallel=st.integers(1, 4),
    layers=st.lists(st.integers(0, 5), min_size=2, max_size=2).map(sorted),
)
def test_estimate_never_shrinks_as_more_layers_go_to_the_gpu(facts, context, parallel, layers):
    few, more = (
        estimate(facts, LaunchSettings(context=context, parallel=parallel, gpu_layers=n, on_gpu=True)) for n in layers
    )
    assert few.weights <= more.weights
    assert few.total <= more.total
    every = estimate(facts, LaunchSettings(context=context, parallel=parallel, gpu_layers=-1, on_gpu=True))
    assert more.total <= every.total


# What the estimator's parts are checked against: llama-server's own buffer sizes (recorded, ``-lv 4``).
RECORDED_LOG = """\
0.00.020.576 I load_tensors:   CPU_Mapped model buffer size =    73.25 MiB
0.00.020.856 I llama_context:        CPU  output buffer size =     0.00 MiB
0.00.020.891 I llama_kv_cache:        CPU KV buffer size =     8.00 MiB
0.00.027.336 I sched_reserve:        CPU compute buffer size =    10.01 MiB
"""


@pytest.mark.parametrize(
    "log, expected",
    [
        (RECORDED_LOG, {"model": 73.25, "kv": 8.0, "compute": 10.01}),
        (
            "load_tensors:        CUDA0 model buffer size =   100.00 MiB\n"
            "load_tensors:   CPU_Mapped model buffer size =    10.00 MiB\n",
            {"model": 100.0},
        ),  # host buffers: not the GPU's
        (
            "llama_kv_cache:      CUDA0 KV buffer size =    64.00 MiB\n"
            "llama_kv_cache:      CUDA1 KV buffer size =    32.50 MiB\n"
            "llama_context:      CUDA0 compute buffer size =   300.75 MiB\n"
            "llama_context:  CUDA_Host compute buffer size =    12.00 MiB\n",
            {"kv": 96.5, "compute": 300.75},
        ),
        ("", {}),
        ("llama_context:        CPU  output buffer size =     0.49 MiB\n", {}),
    ],
)
def test_reported_buffers(log, expected):
    assert reported_buffers(log) == expected
