"""What the memory estimator needs to know of a model file: plain data, read by ``runtime/gguf_meta.py``."""

from __future__ import annotations

from dataclasses import dataclass


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
