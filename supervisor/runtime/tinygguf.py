"""Writing small, valid llama-architecture GGUF models with random weights.

They let a CPU-only or offline host (and the test suite) run a real
llama-server: the text is noise, but loading, tokens, timings and the
metadata a memory estimator reads are all real. ``localllmctl model
generate`` is the command; ``blocks`` and ``embedding`` scale the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
WORDS = [
    "hello",
    "world",
    "the",
    "a",
    "model",
    "local",
    "llm",
    "ok",
    "yes",
    "no",
    "▁hello",
    "▁world",
    "▁the",
    "▁a",
    "▁is",
    "▁ok",
    "▁yes",
    "▁no",
    "▁model",
    "▁test",
    "▁local",
    "▁llm",
    "▁chat",
    "▁answer",
    "▁question",
    "▁ping",
    "▁pong",
    "▁data",
    "▁one",
    "▁two",
    "▁three",
    "▁four",
    "▁five",
    "▁six",
    "▁seven",
    "▁eight",
    "▁nine",
    "▁ten",
    "▁red",
    "▁blue",
    "▁green",
    "▁cat",
    "▁dog",
    "▁sun",
    "▁moon",
    "▁sky",
    "▁tree",
    "▁rock",
    "▁fish",
    "▁bird",
    "▁car",
    "▁road",
]


@dataclass(frozen=True)
class Shape:
    """The dimensions of a generated model; checked on creation."""

    embedding: int = 64
    blocks: int = 2
    heads: int = 4
    kv_heads: int = 2
    feed_forward: int = 0  # 0: twice the embedding
    context: int = 2048
    extra_vocab: int = 0  # more normal tokens, to make the vocabulary (and the output head) bigger
    tied_embeddings: bool = False  # no output.weight: the head is the token embedding (Gemma, Llama 3.2 1B/3B)

    def __post_init__(self) -> None:
        for what in ("embedding", "blocks", "heads", "kv_heads", "context"):
            if getattr(self, what) <= 0:
                raise ValueError(f"{what} must be a positive number (got {getattr(self, what)})")
        for what in ("feed_forward", "extra_vocab"):
            if getattr(self, what) < 0:
                raise ValueError(f"{what} must not be negative (got {getattr(self, what)})")
        if self.embedding % self.heads or self.heads % self.kv_heads:
            raise ValueError("embedding must divide by heads, and heads by kv_heads")

    @property
    def head_dim(self) -> int:
        return self.embedding // self.heads

    @property
    def ffn(self) -> int:
        return self.feed_forward or self.embedding * 2

    @property
    def words(self) -> list[str]:
        return WORDS + [f"▁w{i}" for i in range(self.extra_vocab)]

    @property
    def tokens(self) -> list[str]:
        return SPECIAL_TOKENS + [f"<0x{i:02X}>" for i in range(256)] + self.words


def write_tiny_model(
    path: Path,
    *,
    embedding: int = 64,
    blocks: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    feed_forward: int | None = None,
    context: int = 2048,
    extra_vocab: int = 0,
    tied_embeddings: bool = False,
    seed: int = 0,
    name: str = "localllm-tiny",
) -> Path:
    """Write a random-weight llama model to ``path`` (atomically) and return it.

    With ``tied_embeddings`` the file has no ``output.weight``, and llama.cpp uses ``token_embd`` as
    the output head, duplicating it onto the GPU.
    """
    import gguf  # imported here: only this command needs it at run time

    shape = Shape(embedding, blocks, heads, kv_heads, feed_forward or 0, context, extra_vocab, tied_embeddings)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        _write_metadata(writer, gguf, shape, name)
        _write_tensors(writer, shape, np.random.default_rng(seed))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    tmp.replace(path)
    return path


def _write_metadata(writer, gguf, shape: Shape, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.embedding)
    writer.add_block_count(shape.blocks)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    words = shape.words
    writer.add_token_list(shape.tokens)
    writer.add_token_scores([0.0] * 3 + [-1000.0] * 256 + [-float(i) for i in range(len(words))])
    writer.add_token_types(
        [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
        + [gguf.TokenType.BYTE] * 256
        + [gguf.TokenType.NORMAL] * len(words)
    )
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def _write_tensors(writer, shape: Shape, rng: np.random.Generator) -> None:
    vocab, embd, kv = len(shape.tokens), shape.embedding, shape.kv_heads * shape.head_dim

    def tensor(name: str, *dims: int, ones: bool = False) -> None:
        data = np.ones(dims, np.float32) if ones else (rng.standard_normal(dims) * 0.02).astype(np.float32)
        writer.add_tensor(name, data)

    tensor("token_embd.weight", vocab, embd)
    tensor("output_norm.weight", embd, ones=True)
    if not shape.tied_embeddings:
        tensor("output.weight", vocab, embd)
    for block in range(shape.blocks):
        prefix = f"blk.{block}."
        tensor(prefix + "attn_norm.weight", embd, ones=True)
        tensor(prefix + "ffn_norm.weight", embd, ones=True)
        tensor(prefix + "attn_q.weight", embd, embd)
        tensor(prefix + "attn_k.weight", kv, embd)
        tensor(prefix + "attn_v.weight", kv, embd)
        tensor(prefix + "attn_output.weight", embd, embd)
        tensor(prefix + "ffn_gate.weight", shape.ffn, embd)
        tensor(prefix + "ffn_up.weight", shape.ffn, embd)
        tensor(prefix + "ffn_down.weight", embd, shape.ffn)
