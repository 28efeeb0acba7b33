"""How much memory a llama.cpp model needs on its device: a pure function of GGUF facts and launch settings.

It models the llama.cpp we pin (the one vendored in llama-cpp-python 0.3.36, build b11312, commit
0c1e57098; the GPU profiles' image tag names the same build). Paths below are in that source tree.
Every setting it depends on is passed to llama-server explicitly (``backends/llamacpp.container_spec``),
so neither ``--fit`` nor a new default can change the sizes behind its back.

The parts, each as llama.cpp allocates it:

- **weights**: the tensor bytes of the layers on the device. ``-ngl N`` counts the output layer as
  one of the N and fills from the last layer down, and the token embedding always stays in host
  memory (src/llama-model.cpp: llama_model_base::load_tensors). A file whose output head is tied to
  its token embedding gets a second copy of it as the head on the output layer's device (the
  ``output_head`` part); on the CPU that copy is the same mmap'd tensor and costs nothing;
- **KV cache**: cells × per-layer (K + V) width × bytes per element of the cache type. The
  context is padded to 256; without a unified cache each of the ``parallel`` slots has a stream of
  its own of context / slots cells, padded to 256 again (src/llama-context.cpp: the constructor);
  a unified cache is one stream of the whole context. Sliding-window layers keep
  ``window (× slots when unified) + ubatch`` cells per stream, padded to 256, when that is smaller
  (src/llama-kv-cache-iswa.cpp);
- **compute**: the scheduler's worst-case graph for one micro-batch of ``ubatch`` tokens, reserved
  with one output row per slot (src/llama-context.cpp: sched_reserve; llama-server caps the outputs
  at the slot count, tools/server/server-context.cpp: server_output_limits). With flash attention
  that is the attention mask (one stream's cells × ubatch, f16; a second one for sliding-window
  layers) plus the larger of the feed-forward activations and the output rows; without flash
  attention the f32 scores of every head are materialized, and the masks are f32;
- **outputs**: the logits buffer, vocabulary × slots f32 (src/llama-context.cpp: output_reserve). It
  lives in host memory (pinned ``CUDA_Host`` memory with a GPU), so it is counted on the CPU only;
- **overhead**: the CUDA context and library workspaces on a GPU; none on CPU.

The compute formula was fitted on llama-server's own reported buffer sizes
(see tests/integration/test_estimator_accuracy.py, which checks it is within
10% for several shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

from supervisor.core.gguf_facts import GgufFacts

MIB = 1024**2
GPU_RUNTIME_OVERHEAD = 450 * MIB
DEFAULT_UBATCH = 512
DEFAULT_BATCH = 2048  # llama-server's -b, which we leave alone: it caps the micro-batch
KV_PAD = 256  # llama.cpp pads the context, each stream and the sliding-window cache to this
CACHE_TYPE_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
    "iq4_nl": 18 / 32,
}


@dataclass(frozen=True)
class LaunchSettings:
    context: int
    parallel: int = 1
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    gpu_layers: int = -1  # -1 or more than the block count: every layer and the output head
    on_gpu: bool = False
    ubatch: int = DEFAULT_UBATCH
    flash_attention: bool = True
    kv_unified: bool = False  # one KV stream shared by the slots instead of one per slot


@dataclass(frozen=True)
class Estimate:
    weights: int  # includes output_head
    kv_cache: int
    compute: int
    overhead: int
    offloaded_layers: int  # blocks on the GPU (the output head is not counted here)
    total_layers: int
    output_head: int = 0  # the duplicated head of a tied-embedding model, when it is on the device
    outputs: int = 0  # the logits buffer, in host memory

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.outputs + self.overhead

    def as_dict(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "output_head": self.output_head,
            "kv_cache": self.kv_cache,
            "compute": self.compute,
            "outputs": self.outputs,
            "overhead": self.overhead,
            "total": self.total,
            "offloaded_layers": self.offloaded_layers,
            "total_layers": self.total_layers,
        }


def estimate(facts: GgufFacts, launch: LaunchSettings) -> Estimate:
    """Bytes the model needs on its device (GPU when ``launch.on_gpu``, else host memory)."""
    layers = facts.block_count
    if launch.on_gpu:
        offloaded, head = gpu_offload(layers, launch.gpu_layers)
        on_device = range(layers - offloaded, layers)
        output_head = facts.tied_output_bytes if head else 0
        weights = sum(facts.layer_bytes[i] for i in on_device) + (facts.output_bytes + output_head if head else 0)
        outputs = 0
        overhead = GPU_RUNTIME_OVERHEAD
    else:
        offloaded, head = 0, True
        on_device = range(layers)
        output_head = 0  # the duplicate is the same mmap'd tensor as token_embd
        weights = facts.weight_bytes
        outputs = output_buffer_bytes(facts, launch)
        overhead = 0
    kv = sum(_kv_bytes(facts, launch, i) for i in on_device)
    compute = _compute_bytes(facts, launch) if head else 0
    return Estimate(weights, int(kv), int(compute), overhead, offloaded, layers, output_head, outputs)


def gpu_offload(layers: int, gpu_layers: int) -> tuple[int, bool]:
    """(blocks on the GPU, whether the output layer is) for ``-ngl gpu_layers``; -1 means all.

    llama.cpp counts the output layer as one of the N: ``-ngl N`` puts the output layer and the
    last N - 1 blocks on the GPU, and needs N = blocks + 1 for all of them
    (src/llama-model.cpp: load_tensors, ``i_gpu_start = n_layer + 1 - n_gpu_layers``).
    """
    if gpu_layers < 0:
        return layers, True
    if gpu_layers == 0:
        return 0, False
    return min(gpu_layers - 1, layers), True


def kv_streams(launch: LaunchSettings) -> tuple[int, int]:
    """(cells per stream, streams) of the KV cache (src/llama-context.cpp: the constructor's n_ctx_seq)."""
    n_ctx = _pad(launch.context, KV_PAD)
    if launch.kv_unified:
        return n_ctx, 1
    return _pad(n_ctx // launch.parallel, KV_PAD), launch.parallel


def micro_batch(launch: LaunchSettings) -> int:
    """Tokens in the reserved micro-batch: n_ubatch = min(ubatch, batch, context), as a multiple of the slots
    (src/llama-context.cpp: the constructor's n_ubatch and graph_reserve)."""
    ubatch = min(launch.ubatch, DEFAULT_BATCH, launch.context)
    return _pad(ubatch, launch.parallel)


def output_buffer_bytes(facts: GgufFacts, launch: LaunchSettings) -> int:
    """The logits buffer: one f32 row of the vocabulary per slot (src/llama-context.cpp: output_reserve)."""
    return 4 * facts.vocab_size * launch.parallel


def _swa_cells(facts: GgufFacts, launch: LaunchSettings) -> int:
    """Cells per stream of a sliding-window layer (src/llama-kv-cache-iswa.cpp: size_swa)."""
    per_stream, _ = kv_streams(launch)
    window = facts.sliding_window * (launch.parallel if launch.kv_unified else 1)
    ubatch = min(launch.ubatch, DEFAULT_BATCH, launch.context)
    return _pad(min(per_stream, window + ubatch), KV_PAD)


def _kv_bytes(facts: GgufFacts, launch: LaunchSettings, layer: int) -> float:
    k_bytes = CACHE_TYPE_BYTES[launch.cache_type_k]
    v_bytes = CACHE_TYPE_BYTES[launch.cache_type_v]
    width = facts.head_count_kv[layer] * (facts.key_length * k_bytes + facts.value_length * v_bytes)
    per_stream, streams = kv_streams(launch)
    cells = _swa_cells(facts, launch) if facts.swa_layers[layer] else per_stream
    return streams * cells * width


def _compute_bytes(facts: GgufFacts, launch: LaunchSettings) -> int:
    tokens = micro_batch(launch)
    per_stream, _ = kv_streams(launch)  # the mask of a stream spans its cells (src/llama-graph.cpp)
    per_token = 4 * tokens  # f32 activations
    feed_forward = per_token * (2 * facts.embedding + 3.5 * facts.feed_forward)
    rows = min(tokens, launch.parallel)  # one output row per slot at reservation time
    logits = per_token * facts.embedding + 4 * rows * facts.vocab_size
    if any(facts.swa_layers):  # a second mask for the sliding-window layers
        masks = per_stream + _swa_cells(facts, launch)
    else:
        masks = per_stream
    if launch.flash_attention:  # an f16 mask; the activations around it
        return int(masks * tokens * 2 + max(feed_forward, logits))
    # Without flash attention the f32 scores of every head are materialized beside an f32 mask, with
    # Q, K, V and the residual stream live around them (5.5 × embedding a token, fitted on two shapes).
    scores = per_stream * tokens * 4 * facts.head_count + 5.5 * per_token * facts.embedding
    return int(masks * tokens * 4 + max(scores, feed_forward, logits))


def _pad(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple
