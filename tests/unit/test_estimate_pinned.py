"""supervisor.core.estimate against the llama.cpp we pin (b11312): padding, KV streams, the reserved graph.

The numbers are worked out by hand from the sources each test cites, on the same made-up model as
test_estimate.py: 4 layers whose KV cells cost 512, 512, 256 and 256 bytes in f16 (1536 in all),
embedding 256, feed-forward 1024, 8 heads, a vocabulary of 1000.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.core.estimate import LaunchSettings, estimate, kv_streams, micro_batch

from .test_estimate import FACTS, SWA

FF_512 = 4 * 512 * (2 * 256 + 3.5 * 1024)  # 8_388_608: the feed-forward activations of 512 tokens


@pytest.mark.parametrize(
    "launch, streams",
    [
        (LaunchSettings(context=1000), (1024, 1)),  # llama_context: n_ctx padded to 256
        (LaunchSettings(context=4096, parallel=4), (1024, 4)),  # n_ctx_seq = n_ctx / n_seq_max
        (LaunchSettings(context=4096, parallel=3), (1536, 3)),  # 1365 padded to 1536, so n_ctx grows to 4608
        (LaunchSettings(context=1000, parallel=2), (512, 2)),
        (LaunchSettings(context=4096, parallel=4, kv_unified=True), (4096, 1)),  # one stream of the whole context
        (LaunchSettings(context=1000, parallel=4, kv_unified=True), (1024, 1)),
    ],
)
def test_kv_streams(launch, streams):
    assert kv_streams(launch) == streams


@pytest.mark.parametrize(
    "launch, tokens",
    [
        (LaunchSettings(context=4096), 512),
        (LaunchSettings(context=300), 300),  # n_batch = min(n_ctx, 2048) caps it
        (LaunchSettings(context=8192, ubatch=4096), 2048),  # and so does the batch we leave at 2048
        (LaunchSettings(context=4096, parallel=3), 513),  # graph_reserve: a multiple of the slots
    ],
)
def test_micro_batch(launch, tokens):
    assert micro_batch(launch) == tokens


def test_a_context_off_the_padding_is_padded():
    got = estimate(FACTS, LaunchSettings(context=1000))
    assert got.kv_cache == 1024 * 1536  # not 1000 × 1536
    assert got.compute == 1024 * 512 * 2 + FF_512


def test_slots_that_do_not_divide_the_context_get_more_cells_and_a_wider_batch():
    got = estimate(FACTS, LaunchSettings(context=4096, parallel=3))
    assert got.kv_cache == 3 * 1536 * 1536  # 7_077_888, not 4096 × 1536
    # mask 1536 × 513 × 2; feed-forward 4 × 513 × 4096 (the logits, 4 × 513 × 256 + 4 × 3 × 1000, are smaller)
    assert got.compute == 1536 * 513 * 2 + 4 * 513 * 4096
    assert got.outputs == 4 * 1000 * 3  # the logits buffer: one row per slot


def test_a_unified_cache_holds_the_same_cells_but_every_slot_attends_over_all_of_them():
    split = estimate(FACTS, LaunchSettings(context=4096, parallel=4))
    unified = estimate(FACTS, LaunchSettings(context=4096, parallel=4, kv_unified=True))
    assert split.kv_cache == unified.kv_cache == 4096 * 1536
    assert split.compute == 1024 * 512 * 2 + FF_512  # the mask spans a stream: 1024 cells
    assert unified.compute == 4096 * 512 * 2 + FF_512  # one stream of 4096


@pytest.mark.parametrize(
    "launch, kv",
    [
        # unified: one SWA stream of min(4096, window 100 × 4 slots + 512) = 912 -> 1024 cells,
        # layers 0 and 2 (512 + 256 bytes a cell); the full layers 1 and 3 hold 4096.
        (LaunchSettings(context=4096, parallel=4, kv_unified=True), 1024 * 768 + 4096 * 768),
        # per slot: 4 streams of min(1024, 612) -> 768 cells
        (LaunchSettings(context=4096, parallel=4), 4 * 768 * 768 + 4096 * 768),
        # unified, window × slots beyond the context: the whole context
        (LaunchSettings(context=1024, parallel=8, kv_unified=True), 1024 * 1536),
    ],
)
def test_sliding_window_cells_of_a_unified_cache(launch, kv):
    assert estimate(SWA, launch).kv_cache == kv


@pytest.mark.parametrize(
    "flash, compute",
    [
        # f16 masks: the full layers' 4096 × 512 and the window's 768 × 512
        (True, (4096 + 768) * 512 * 2 + FF_512),
        # without flash attention: both masks f32, and f32 scores over the full layers' cells for every head
        # with Q, K, V and the residual beside them (5.5 × 4 × 512 × 256)
        (False, (4096 + 768) * 512 * 4 + 4096 * 512 * 4 * 8 + 5.5 * 4 * 512 * 256),
    ],
)
def test_sliding_window_layers_add_a_mask_of_their_own(flash, compute):
    assert estimate(SWA, LaunchSettings(context=4096, flash_attention=flash)).compute == compute


def test_the_logits_buffer_is_host_memory_so_a_gpu_estimate_leaves_it_out():
    cpu = estimate(FACTS, LaunchSettings(context=1024, parallel=2))
    gpu = estimate(FACTS, LaunchSettings(context=1024, parallel=2, on_gpu=True))
    assert (cpu.outputs, gpu.outputs) == (4 * 1000 * 2, 0)  # pinned CUDA_Host memory with a GPU
    assert cpu.as_dict()["outputs"] == 8000


def test_the_logits_rows_follow_the_slots():
    # a vocabulary big enough that the output rows outweigh the feed-forward: 4 × 512 × 256 + 4 × slots × vocab
    big = replace(FACTS, feed_forward=64, vocab_size=300_000)
    one, four = (estimate(big, LaunchSettings(context=1024, parallel=p)).compute for p in (1, 4))
    assert one == 1024 * 512 * 2 + 4 * 512 * 256 + 4 * 1 * 300_000
    assert four == 256 * 512 * 2 + 4 * 512 * 256 + 4 * 4 * 300_000


CONTEXTS = st.integers(128, 1 << 18)


@settings(max_examples=300, deadline=None)
@given(context=CONTEXTS, parallel=st.integers(1, 8))
def test_unified_never_holds_more_full_attention_cells_but_never_a_smaller_mask(context, parallel):
    split = estimate(FACTS, LaunchSettings(context=context, parallel=parallel))
    unified = estimate(FACTS, LaunchSettings(context=context, parallel=parallel, kv_unified=True))
    assert unified.kv_cache <= split.kv_cache
    assert unified.compute >= split.compute


@settings(max_examples=300, deadline=None)
@given(
    facts=st.sampled_from([FACTS, SWA]),
    contexts=st.lists(CONTEXTS, min_size=2, max_size=2).map(sorted),
    parallel=st.integers(1, 8),
    unified=st.booleans(),
    flash=st.booleans(),
    on_gpu=st.booleans(),
)
def test_a_unified_estimate_never_shrinks_as_the_context_grows(facts, contexts, parallel, unified, flash, on_gpu):
    small, large = (
        estimate(
            facts,
            LaunchSettings(context=c, parallel=parallel, kv_unified=unified, flash_attention=flash, on_gpu=on_gpu),
        )
        for c in contexts
    )
    assert small.kv_cache <= large.kv_cache
    assert small.compute <= large.compute
    assert small.total <= large.total
