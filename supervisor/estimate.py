"""How much memory a llama.cpp model needs on its device: a pure function of GGUF facts and launch settings.

The parts, each as llama.cpp allocates it:

- **weights**: the tensor bytes of the layers on the device (llama.cpp keeps
  the token embedding in host memory when offloading, and puts the output
  head on the GPU only when every layer is offloaded);
- **KV cache**: context cells × per-layer (K + V) width × bytes per element of
  the cache type. llama-server shares one context among its parallel slots, so
  slots do not multiply it (each slot gets context / slots cells), except on
  sliding-window layers, where each slot keeps ``window + ubatch`` cells
  (padded to 256) when that is smaller than its share;
- **compute**: the scheduler's worst-case graph for one micro-batch. With
  flash attention (llama-server's default) that is the attention mask
  (context × ubatch, f16) plus the larger of the feed-forward activations and
  the output rows (one per slot at reservation time); without flash attention
  the attention scores are materialized;
- **overhead**: the CUDA context and library workspaces on a GPU; none on CPU.

The compute formula was fitted on llama-server's own reported buffer sizes
(see tests/integration/test_estimator_accuracy.py, which checks it is within
10% for several shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

from .gguf_meta import GgufFacts

MIB = 1024**2
GPU_RUNTIME_OVERHEAD = 450 * MIB
DEFAULT_UBATCH = 512
CACHE_TYPE_BYTES = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0,
    "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32,
}


@dataclass(frozen=True)
class LaunchSettings:
    context: int
    parallel: int = 1
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    gpu_layers: int = -1  # -1 or more than the block count: every layer
    on_gpu: bool = False
    ubatch: int = DEFAULT_UBATCH
    flash_attention: bool = True


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv_cache: int
    compute: int
    overhead: int
    offloaded_layers: int
    total_layers: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.overhead

    def as_dict(self) -> dict:
        return {"weights": self.weights, "kv_cache": self.kv_cache, "compute": self.compute,
                "overhead": self.overhead, "total": self.total,
                "offloaded_layers": self.offloaded_layers, "total_layers": self.total_layers}


def estimate(facts: GgufFacts, launch: LaunchSettings) -> Estimate:
    """Bytes the model needs on its device (GPU when ``launch.on_gpu``, else host memory)."""
    layers = facts.block_count
    everything = launch.gpu_layers < 0 or launch.gpu_layers > layers
    if launch.on_gpu:
        offloaded = layers if everything else launch.gpu_layers
        on_device = range(layers - offloaded, layers)
        weights = sum(facts.layer_bytes[i] for i in on_device) + (facts.output_bytes if everything else 0)
        overhead = GPU_RUNTIME_OVERHEAD
    else:
        offloaded = 0
        on_device = range(layers)
        weights = facts.weight_bytes
        overhead = 0
    kv = sum(_kv_bytes(facts, launch, i) for i in on_device)
    compute = _compute_bytes(facts, launch) if on_device or not launch.on_gpu else 0
    return Estimate(weights, int(kv), int(compute), overhead, offloaded, layers)


def _kv_bytes(facts: GgufFacts, launch: LaunchSettings, layer: int) -> float:
    k_bytes = CACHE_TYPE_BYTES[launch.cache_type_k]
    v_bytes = CACHE_TYPE_BYTES[launch.cache_type_v]
    width = facts.head_count_kv[layer] * (facts.key_length * k_bytes + facts.value_length * v_bytes)
    cells = launch.context
    if facts.swa_layers[layer]:
        per_slot = launch.context // launch.parallel
        ubatch = min(launch.ubatch, launch.context)
        cells = launch.parallel * min(per_slot, _pad(facts.sliding_window + ubatch, 256))
    return cells * width


def _compute_bytes(facts: GgufFacts, launch: LaunchSettings) -> int:
    ubatch = min(launch.ubatch, launch.context)
    per_slot = launch.context // launch.parallel  # each slot attends over its own share of the context
    per_token = 4 * ubatch  # f32 activations
    feed_forward = per_token * (2 * facts.embedding + 3.5 * facts.feed_forward)
    logits = per_token * facts.embedding + 4 * launch.parallel * facts.vocab_size  # one output row per slot
    if launch.flash_attention:
        attention = per_slot * ubatch * 2  # the f16 mask
    else:
        attention = per_slot * ubatch * 4 * facts.head_count
    return int(attention + max(feed_forward, logits))


def _pad(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple
