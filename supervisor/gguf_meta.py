"""Reading what the memory estimator needs from a GGUF file's header.

``read_gguf_facts`` does the I/O (the ``gguf`` package memory-maps the file,
so only the header and tensor index are touched); ``GgufFacts`` is plain data
for the pure estimator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import BadRequest

_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class GgufFacts:
    architecture: str
    block_count: int
    embedding: int
    feed_forward: int
    head_count: int
    head_count_kv: tuple[int, ...]  # per layer
    key_length: int  # per head
    value_length: int
    vocab_size: int
    context_train: int
    sliding_window: int  # 0: none
    swa_layers: tuple[bool, ...]  # per layer: True when the layer uses the sliding window
    layer_bytes: tuple[int, ...]  # tensor bytes of each block
    input_bytes: int  # token embedding (always kept in host memory by llama.cpp)
    output_bytes: int  # output norm and head, and any other non-block tensors
    # The file has no ``output.weight``: the output head is tied to the token embedding. llama.cpp then
    # creates ``token_embd`` a second time as the output head (TENSOR_DUPLICATED; see
    # src/llama-model-loader.cpp: llama_model_loader::create_tensor), on the output layer's device. On
    # the CPU that copy is the same mmap'd tensor; on a GPU it is a copy of these bytes.
    tied_output_bytes: int = 0

    @property
    def weight_bytes(self) -> int:
        return sum(self.layer_bytes) + self.input_bytes + self.output_bytes


# Architectures whose GGUF gives a sliding window but no per-layer pattern:
# every Nth layer uses full attention (llama.cpp hard-codes these).
SWA_EVERY = {"gemma2": 2, "gemma3": 6, "cohere2": 4}


def read_gguf_facts(path: Path) -> GgufFacts:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError, IndexError, KeyError) as exc:  # what gguf raises on truncated or foreign files
        raise BadRequest(f"cannot read GGUF file {path}: {exc}") from None
    fields = {name: field.contents() for name, field in reader.fields.items()}
    arch = fields.get("general.architecture", "llama")

    def key(name: str, default=None):
        return fields.get(f"{arch}.{name}", default)

    blocks = int(key("block_count", 0))
    embedding = int(key("embedding_length", 0))
    heads = _first(key("attention.head_count", 1))
    kv_heads = key("attention.head_count_kv", heads)
    kv_per_layer = tuple(int(k) for k in kv_heads) if isinstance(kv_heads, list) else (int(kv_heads),) * blocks
    head_dim = embedding // heads if heads else 0
    window = int(key("attention.sliding_window", 0) or 0)
    layer_bytes = [0] * blocks
    input_bytes = output_bytes = 0
    for tensor in reader.tensors:
        match = _LAYER.match(tensor.name)
        if match and int(match.group(1)) < blocks:
            layer_bytes[int(match.group(1))] += int(tensor.n_bytes)
        elif tensor.name.startswith("token_embd"):
            input_bytes += int(tensor.n_bytes)
        else:
            output_bytes += int(tensor.n_bytes)
    tokens = fields.get("tokenizer.ggml.tokens") or []
    return GgufFacts(
        architecture=arch,
        block_count=blocks,
        embedding=embedding,
        feed_forward=_first(key("feed_forward_length", embedding * 4)),
        head_count=heads,
        head_count_kv=kv_per_layer,
        key_length=int(key("attention.key_length", head_dim)),
        value_length=int(key("attention.value_length", head_dim)),
        vocab_size=int(key("vocab_size", len(tokens)) or len(tokens)),
        context_train=int(key("context_length", 0)),
        sliding_window=window,
        swa_layers=_swa_layers(arch, blocks, window, key("attention.sliding_window_pattern")),
        layer_bytes=tuple(layer_bytes),
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        tied_output_bytes=_tied_output_bytes(reader.tensors),
    )


def _tied_output_bytes(tensors) -> int:
    """The bytes llama.cpp duplicates as the output head when the file ties it to the token embedding.

    Every architecture that may lack ``output.weight`` falls back to ``token_embd.weight`` with
    TENSOR_DUPLICATED (src/models/*.cpp: load_arch_tensors); an encoder-only file without any head is
    counted too, which only errs on the safe side.
    """
    if any(t.name == "output.weight" for t in tensors):
        return 0
    return sum(int(t.n_bytes) for t in tensors if t.name == "token_embd.weight")


def _first(value) -> int:
    """Some keys are per-layer arrays; the estimator uses the largest."""
    return int(max(value)) if isinstance(value, list) else int(value)


def _swa_layers(arch: str, blocks: int, window: int, pattern) -> tuple[bool, ...]:
    if not window:
        return (False,) * blocks
    if isinstance(pattern, list):
        return tuple(bool(p) for p in pattern[:blocks])
    every = int(pattern) if isinstance(pattern, int) and pattern > 0 else SWA_EVERY.get(arch, 0)
    if every:
        return tuple((i + 1) % every != 0 for i in range(blocks))
    return (True,) * blocks
