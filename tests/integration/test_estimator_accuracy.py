"""The estimator against llama-server's own accounting.

llama-server prints its model, KV, compute and output buffer sizes at start-up (``-lv 4``).
On this CPU-only machine the CPU buffers stand in for GPU ones. Each server runs with exactly the
flags a container of ours gets (``llamacpp.launch_flags``), so this also proves the CPU build
accepts every one of them. For every shape below, the estimate must be within 10% of llama-server's
total and its KV cache exact; the table of both is printed (``pytest -s``) as the recorded comparison.
"""

from __future__ import annotations

import re

import pytest

from supervisor.core.backends.llamacpp import launch_flags, reported_buffers
from supervisor.core.estimate import LaunchSettings, estimate
from supervisor.runtime.gguf_meta import read_gguf_facts
from supervisor.runtime.tinygguf import write_tiny_model

from .conftest import RUN_ID, TEST_RUN_LABEL, free_tcp_port, poll_for

MIB = 1024**2
_OUTPUT_LINE = re.compile(r"\bCPU\s+output buffer size =\s+([\d.]+) MiB")

# (id, model shape, launch settings): depth, width, heads and KV heads, context, vocabulary, slots,
# cache type, a tied head, a unified cache and flash attention all vary. The first four were used to
# fit the compute formula with flash attention, the first two without it its formula; the rest were not.
CASES = [
    ("shallow-narrow", dict(embedding=64, blocks=2, heads=4, kv_heads=2), LaunchSettings(context=2048)),
    (
        "deep-8-layers",
        dict(embedding=512, blocks=8, heads=4, kv_heads=2, feed_forward=1024),
        LaunchSettings(context=1024),
    ),
    ("wide-mha", dict(embedding=1024, blocks=2, heads=16, kv_heads=4, feed_forward=4096), LaunchSettings(context=1024)),
    (
        "long-context",
        dict(embedding=512, blocks=4, heads=8, kv_heads=8, feed_forward=2048),
        LaunchSettings(context=16384),
    ),
    ("big-vocab", dict(embedding=256, blocks=3, heads=4, kv_heads=1, extra_vocab=40000), LaunchSettings(context=2048)),
    ("four-slots", dict(embedding=384, blocks=6, heads=6, kv_heads=2), LaunchSettings(context=4096, parallel=4)),
    (
        "q8-cache",
        dict(embedding=256, blocks=12, heads=8, kv_heads=2),
        LaunchSettings(context=8192, cache_type_k="q8_0", cache_type_v="q8_0"),
    ),
    # a tied head: on the CPU the duplicate is the mmap'd token_embd, so the model buffer is the file
    (
        "tied-head",
        dict(embedding=256, blocks=3, heads=4, kv_heads=1, extra_vocab=40000, tied_embeddings=True),
        LaunchSettings(context=2048),
    ),
    # the GPU bench's model: a 150k vocabulary, tied, two slots (two rows of logits)
    (
        "tied-150k-vocab",
        dict(embedding=64, blocks=2, heads=4, kv_heads=2, extra_vocab=150_000, tied_embeddings=True),
        LaunchSettings(context=2048, parallel=2),
    ),
    # one KV stream shared by four slots: the mask spans the whole context
    (
        "unified-four-slots",
        dict(embedding=384, blocks=6, heads=6, kv_heads=2),
        LaunchSettings(context=4096, parallel=4, kv_unified=True),
    ),
    # 3000 is padded to 3072, a third of it to 1280 a slot: 3840 cells; the micro-batch becomes 513
    (
        "three-slots-padded",
        dict(embedding=256, blocks=4, heads=4, kv_heads=2),
        LaunchSettings(context=3000, parallel=3),
    ),
    (
        "no-flash-attention",
        dict(embedding=256, blocks=4, heads=8, kv_heads=2),
        LaunchSettings(context=4096, flash_attention=False),
    ),
    (
        "no-flash-attention-slots",
        dict(embedding=512, blocks=2, heads=16, kv_heads=4, feed_forward=2048),
        LaunchSettings(context=2048, parallel=2, flash_attention=False),
    ),
    (
        "no-flash-attention-long",
        dict(embedding=384, blocks=3, heads=6, kv_heads=2),
        LaunchSettings(context=8192, flash_attention=False),
    ),
]


def run_llama_server(engine, path, launch: LaunchSettings) -> str:
    command = [
        "-m",
        "/models/m.gguf",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_tcp_port()),
        "-lv",
        "4",
        *launch_flags(launch),
    ]
    container = engine.containers.run(
        "localllm/llama-server:0.3.36-cpu",
        command,
        detach=True,
        network_mode="host",
        labels={TEST_RUN_LABEL: RUN_ID},
        volumes={str(path): {"bind": "/models/m.gguf", "mode": "ro"}},
    )
    try:

        def report() -> str | None:
            container.reload()
            text = container.logs().decode()
            if container.status == "exited":
                raise AssertionError(f"llama-server exited:\n{text[-3000:]}")
            return text if "compute buffer size" in text else None

        return poll_for(report, timeout=120, what="llama-server's buffer report")
    finally:
        container.remove(force=True)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_estimate_is_within_10_percent_of_llama_servers_own_total(case, engine, tmp_path):
    name, shape, launch = case
    path = write_tiny_model(tmp_path / f"{name}.gguf", context=max(launch.context, 2048), **shape)
    log = run_llama_server(engine, path, launch)
    reported = reported_buffers(log)
    outputs = sum(float(mib) for mib in _OUTPUT_LINE.findall(log))
    facts = read_gguf_facts(path)
    ours = estimate(facts, launch)
    theirs = (sum(reported.values()) + outputs) * MIB
    print(
        f"\n{name}: llama-server {reported} output {outputs:.2f} = {theirs / MIB:.2f} MiB; estimate weights "
        f"{ours.weights / MIB:.2f} kv {ours.kv_cache / MIB:.2f} compute {ours.compute / MIB:.2f} "
        f"outputs {ours.outputs / MIB:.2f} = {ours.total / MIB:.2f} MiB; ratio {ours.total / theirs:.3f}"
    )
    assert set(reported) == {"model", "kv", "compute"}
    assert abs(ours.total - theirs) <= 0.10 * theirs
    assert ours.kv_cache / MIB == pytest.approx(reported["kv"], abs=0.01)  # cells and streams exactly
    assert ours.outputs / MIB == pytest.approx(outputs, abs=0.01)
    if facts.tied_output_bytes:  # no copy of the head on the CPU: the model buffer is the file's tensors
        assert ours.weights / MIB == pytest.approx(reported["model"], abs=0.01)
