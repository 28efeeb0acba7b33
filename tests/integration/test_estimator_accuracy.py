"""The estimator against llama-server's own accounting.

llama-server prints its model, KV and compute buffer sizes at start-up (``-lv 4``).
On this CPU-only machine the CPU buffers stand in for GPU ones. For every shape
below, the estimate must be within 10% of llama-server's total; the table of
both is printed (``pytest -s``) as the recorded comparison.
"""

from __future__ import annotations

import pytest

from supervisor.backends.llamacpp import reported_buffers
from supervisor.estimate import LaunchSettings, estimate
from supervisor.gguf_meta import read_gguf_facts
from supervisor.tinygguf import write_tiny_model

from .conftest import RUN_ID, TEST_RUN_LABEL, free_tcp_port, poll_for

MIB = 1024**2

# (id, model shape, context, parallel, cache type): depth, width, heads and KV heads, context,
# vocabulary, slots and cache type all vary. The first four were used to fit the compute formula;
# the rest were not.
CASES = [
    ("shallow-narrow", dict(embedding=64, blocks=2, heads=4, kv_heads=2), 2048, 1, "f16"),
    ("deep-8-layers", dict(embedding=512, blocks=8, heads=4, kv_heads=2, feed_forward=1024), 1024, 1, "f16"),
    ("wide-mha", dict(embedding=1024, blocks=2, heads=16, kv_heads=4, feed_forward=4096), 1024, 1, "f16"),
    ("long-context", dict(embedding=512, blocks=4, heads=8, kv_heads=8, feed_forward=2048), 16384, 1, "f16"),
    ("big-vocab", dict(embedding=256, blocks=3, heads=4, kv_heads=1, extra_vocab=40000), 2048, 1, "f16"),
    ("four-slots", dict(embedding=384, blocks=6, heads=6, kv_heads=2), 4096, 4, "f16"),
    ("q8-cache", dict(embedding=256, blocks=12, heads=8, kv_heads=2), 8192, 1, "q8_0"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_estimate_is_within_10_percent_of_llama_servers_own_total(case, engine, tmp_path):
    name, shape, context, parallel, cache_type = case
    path = write_tiny_model(tmp_path / f"{name}.gguf", context=max(context, 2048), **shape)
    command = ["-m", "/models/m.gguf", "--host", "127.0.0.1", "--port", str(free_tcp_port()),
               "-c", str(context), "--parallel", str(parallel), "-lv", "4",
               "--cache-type-k", cache_type, "--cache-type-v", cache_type]
    container = engine.containers.run(
        "localllm/llama-server:0.3.36-cpu", command, detach=True, network_mode="host",
        labels={TEST_RUN_LABEL: RUN_ID}, volumes={str(path): {"bind": "/models/m.gguf", "mode": "ro"}})
    try:
        def report() -> str | None:
            text = container.logs().decode()
            return text if "compute buffer size" in text else None

        log = poll_for(report, timeout=60, what="llama-server's buffer report")
    finally:
        container.remove(force=True)
    reported = reported_buffers(log)
    ours = estimate(read_gguf_facts(path), LaunchSettings(context=context, parallel=parallel,
                                                          cache_type_k=cache_type, cache_type_v=cache_type))
    theirs = sum(reported.values()) * MIB
    print(f"\n{name}: llama-server {reported} = {theirs / MIB:.2f} MiB; estimate weights "
          f"{ours.weights / MIB:.2f} kv {ours.kv_cache / MIB:.2f} compute {ours.compute / MIB:.2f} "
          f"= {ours.total / MIB:.2f} MiB; ratio {ours.total / theirs:.3f}")
    assert set(reported) == {"model", "kv", "compute"}
    assert abs(ours.total - theirs) <= 0.10 * theirs
