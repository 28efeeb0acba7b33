"""Writing small, valid llama-architecture GGUF models with random weights.

They let a CPU-only or offline host (and the test suite) run a real
llama-server: the text is noise, but loading, tokens, timings and the
metadata a memory estimator reads are all real. ``localllmctl model
generate`` is the command; ``blocks`` and ``embedding`` scale the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
WORDS = ["hello", "world", "the", "a", "model", "local", "llm", "ok", "yes", "no",
         "▁hello", "▁world", "▁the", "▁a", "▁is", "▁ok", "▁yes", "▁no", "▁model", "▁test",
         "▁local", "▁llm", "▁chat", "▁answer", "▁question", "▁ping", "▁pong", "▁data",
         "▁one", "▁two", "▁three", "▁four", "▁five", "▁six", "▁seven", "▁eight", "▁nine",
         "▁ten", "▁red", "▁blue", "▁green", "▁cat", "▁dog", "▁sun", "▁moon", "▁sky",
         "▁tree", "▁rock", "▁fish", "▁bird", "▁car", "▁road"]


def write_tiny_model(
    path: Path,
    *,
    embedding: int = 64,
    blocks: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    feed_forward: int | None = None,
    context: int = 2048,
    seed: int = 0,
    name: str = "localllm-tiny",
) -> Path:
    """Write a random-weight llama model to ``path`` and return it."""
    import gguf  # imported here: only this command needs it at run time

    if embedding % heads or heads % kv_heads:
        raise ValueError("embedding must divide by heads, and heads by kv_heads")
    feed_forward = feed_forward or embedding * 2
    head_dim = embedding // heads
    tokens = SPECIAL_TOKENS + [f"<0x{i:02X}>" for i in range(256)] + WORDS
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(WORDS)
    vocab = len(tokens)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(name)
    writer.add_context_length(context)
    writer.add_embedding_length(embedding)
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(feed_forward)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 3 + [-1000.0] * 256 + [-float(i) for i in range(len(WORDS))])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    rng = np.random.default_rng(seed)

    def tensor(name: str, *shape: int, ones: bool = False) -> None:
        data = np.ones(shape, np.float32) if ones else (rng.standard_normal(shape) * 0.02).astype(np.float32)
        writer.add_tensor(name, data)

    tensor("token_embd.weight", vocab, embedding)
    tensor("output_norm.weight", embedding, ones=True)
    tensor("output.weight", vocab, embedding)
    for block in range(blocks):
        prefix = f"blk.{block}."
        tensor(prefix + "attn_norm.weight", embedding, ones=True)
        tensor(prefix + "ffn_norm.weight", embedding, ones=True)
        tensor(prefix + "attn_q.weight", embedding, embedding)
        tensor(prefix + "attn_k.weight", kv_heads * head_dim, embedding)
        tensor(prefix + "attn_v.weight", kv_heads * head_dim, embedding)
        tensor(prefix + "attn_output.weight", embedding, embedding)
        tensor(prefix + "ffn_gate.weight", feed_forward, embedding)
        tensor(prefix + "ffn_up.weight", feed_forward, embedding)
        tensor(prefix + "ffn_down.weight", embedding, feed_forward)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path
