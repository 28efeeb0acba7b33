"""supervisor.runtime.tinygguf's kinds: the reranker and the tool-calling model, read back with gguf's own reader.

What llama-server needs of them (tests/integration/test_generated_models.py runs them): a reranker must be
an architecture that loads ``cls.output`` (qwen3), pool by RANK, have as many outputs as labels, and carry a
rerank prompt; a tools model must carry a template with a tool-call layout llama.cpp's autoparser reads, the
markers as tokens of their own, and the steering dimensions that make it open and close a call.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from supervisor.cli.ctl import main as ctl_main
from supervisor.runtime import tinygguf
from supervisor.runtime.gguf_meta import read_gguf_facts
from supervisor.runtime.tinygguf import (
    KINDS,
    RERANK_TEMPLATE,
    SPECIAL_TOKENS,
    STEERING,
    TOOL_TEMPLATE,
    WORDS,
    write_tiny_model,
)

VOCAB = len(SPECIAL_TOKENS) + 256 + len(WORDS)


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def shape_of(tensor) -> list[int]:
    return [int(n) for n in tensor.shape]  # ggml order: the row length first


def array(tensor) -> np.ndarray:
    """The tensor as numpy indexes it: [row, column], a row per output (per token for the embedding)."""
    return np.asarray(tensor.data).reshape(list(reversed(shape_of(tensor))))


# -- reranker -------------------------------------------------------------------------------------------------


def test_reranker_is_a_qwen3_model_pooling_by_rank_with_a_two_label_head(tmp_path):
    path = write_tiny_model(tmp_path / "r.gguf", kind="reranker", blocks=3, embedding=64, heads=4, kv_heads=2)
    kv, tensors = read(path)
    assert kv["general.architecture"] == "qwen3"  # llama.cpp loads cls.output for qwen3, not for llama
    assert kv["qwen3.pooling_type"] == int(gguf.PoolingType.RANK) == 4
    assert kv["qwen3.classifier.output_labels"] == ["yes", "no"]  # n_cls_out = 2
    assert kv["qwen3.block_count"] == 3 and kv["qwen3.embedding_length"] == 64
    assert kv["qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)  # qwen3 requires it
    assert not any(key.startswith("llama.") for key in kv)
    # The prompt llama-server fills per document; no chat template of its own (the default one serves chat).
    assert kv["tokenizer.chat_template.rerank"] == RERANK_TEMPLATE
    assert "{query}" in RERANK_TEMPLATE and "{document}" in RERANK_TEMPLATE
    assert kv["tokenizer.chat_templates"] == ["rerank"]
    assert "tokenizer.chat_template" not in kv
    assert kv["tokenizer.ggml.bos_token_id"] == 1 and kv["tokenizer.ggml.eos_token_id"] == 2  # rerank needs both

    assert shape_of(tensors["cls.output.weight"]) == [64, 2]  # {n_embd, n_cls_out}
    for block in range(3):
        assert shape_of(tensors[f"blk.{block}.attn_q_norm.weight"]) == [16]  # the head size
        assert shape_of(tensors[f"blk.{block}.attn_k_norm.weight"]) == [16]
    assert "output.weight" in tensors  # qwen3 reads it when present; the model still chats
    assert len(tensors) == 3 + 1 + 11 * 3


def test_reranker_with_tied_embeddings_keeps_its_head(tmp_path):
    _, tensors = read(write_tiny_model(tmp_path / "r.gguf", kind="reranker", tied_embeddings=True))
    assert "output.weight" not in tensors and "cls.output.weight" in tensors


def test_the_estimator_reads_a_reranker(tmp_path):
    facts = read_gguf_facts(write_tiny_model(tmp_path / "r.gguf", kind="reranker", blocks=2, embedding=64))
    assert (facts.architecture, facts.block_count, facts.embedding, facts.vocab_size) == ("qwen3", 2, 64, VOCAB)
    assert facts.head_count_kv == (2, 2)
    # the head is output-side, and each block carries its two Q/K norms
    block = (2 * 64 + 2 * 16 + 2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64) * 4
    assert facts.layer_bytes == (block, block)
    assert facts.output_bytes == (64 + VOCAB * 64 + 2 * 64) * 4


# -- tools --------------------------------------------------------------------------------------------------------


def test_tools_model_carries_the_template_and_its_markers_as_tokens(tmp_path):
    path = write_tiny_model(tmp_path / "t.gguf", kind="tools", extra_vocab=3)
    kv, tensors = read(path)
    assert kv["general.architecture"] == "llama"
    assert kv["tokenizer.chat_template"] == TOOL_TEMPLATE
    assert kv["tokenizer.ggml.add_space_prefix"] is False
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == VOCAB + 3 + 4
    # appended after every other token, so that the byte tokens keep their ids (3 + byte)
    assert tokens[-4:] == ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
    assert types[-4:] == [gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.USER_DEFINED] * 2
    assert tokens[3 + ord("{")] == "<0x7B>" and tokens[-5] == "▁w2"
    assert len(kv["tokenizer.ggml.scores"]) == len(tokens)
    assert shape_of(tensors["token_embd.weight"]) == [64, len(tokens)]
    assert shape_of(tensors["output.weight"]) == [64, len(tokens)]
    assert "qwen3.pooling_type" not in kv and "llama.pooling_type" not in kv


def test_tool_template_has_the_layout_llama_cpp_detects():
    # common/chat.cpp reads the call layout off the template: the markers around the JSON call, a tools list
    # in the system turn (so that it "supports tools", not only tool calls), and tool results.
    for piece in (
        "{%- if tools %}",
        "tool | tojson",
        "<tools>",
        "message.tool_calls",
        '\'\\n<tool_call>{"name": "\' + tool_call.name + \'", "arguments": \'',
        "tool_call.arguments | tojson",
        "'}</tool_call>'",
        "message.role == 'tool'",
        "<tool_response>",
        "add_generation_prompt",
        "'<|im_start|>assistant\\n'",
    ):
        assert piece in TOOL_TEMPLATE, piece
    # Not one of the layouts with a handler of its own (Qwen3-Coder's XML calls), so the autoparser reads it.
    assert "<function=" not in TOOL_TEMPLATE and "<parameter=" not in TOOL_TEMPLATE


def test_tools_model_steering_dimensions(tmp_path):
    path = write_tiny_model(tmp_path / "t.gguf", kind="tools", blocks=4, embedding=64, seed=3)
    _, tensors = read(path)
    tokens = tinygguf.Shape(kind="tools").tokens
    ids = {token: number for number, token in enumerate(tokens)}
    embedding, head = array(tensors["token_embd.weight"]), array(tensors["output.weight"])
    assert embedding.shape == head.shape == (len(tokens), 64)
    scale = 64 * 4**0.5
    newline, close, brace, quote = ids["<0x0A>"], ids["</tool_call>"], ids["<0x7D>"], ids["<0x22>"]
    # Dimension 0: set by a line break and </tool_call> only; read as "<|im_end|>, else <tool_call>".
    assert sorted(np.flatnonzero(embedding[:, 0])) == sorted([newline, close])
    assert embedding[newline, 0] == embedding[close, 0] == pytest.approx(scale)
    assert sorted(np.flatnonzero(head[:, 0])) == sorted([ids["<|im_end|>"], ids["<tool_call>"]])
    assert head[ids["<|im_end|>"], 0] > head[ids["<tool_call>"], 0] > 0
    # Dimension 1: set by "}" only; read as "</tool_call>".
    assert list(np.flatnonzero(embedding[:, 1])) == [brace]
    assert list(np.flatnonzero(head[:, 1])) == [close]
    # Dimension 2: every token, a tenth as strong; read as '"'.
    assert np.allclose(embedding[:, 2], scale / 10)
    assert list(np.flatnonzero(head[:, 2])) == [quote]
    # Nothing else writes the three dimensions on the way, and the rest stays random.
    steered = [dim for dim, *_ in STEERING]
    for block in range(4):
        for name in ("attn_output", "ffn_down"):
            weights = array(tensors[f"blk.{block}.{name}.weight"])
            assert not weights[steered].any()
            assert np.all(weights[len(steered) :].std(axis=1) > 0.01)
    assert 0.015 < embedding[:, 3:].std() < 0.025 and 0.015 < head[:, 3:].std() < 0.025


def test_the_head_reads_the_steering_as_the_next_token(tmp_path):
    # The steered state of a token (its embedding, which dominates the residual stream: no layer writes those
    # dimensions) through output_norm and the head: the favoured tokens come first, far ahead of the rest.
    _, tensors = read(write_tiny_model(tmp_path / "t.gguf", kind="tools"))
    tokens = tinygguf.Shape(kind="tools").tokens
    embedding, head = array(tensors["token_embd.weight"]), array(tensors["output.weight"])

    def ranking(token: str, favoured: int) -> list[str]:
        state = embedding[tokens.index(token)]
        logits = head @ (state / np.sqrt(np.mean(state**2)))  # output_norm's weights are ones
        order = np.argsort(-logits)
        assert logits[order[favoured - 1]] - logits[order[favoured]] > 5, "far ahead of every other token"
        return [tokens[i] for i in order[:favoured]]

    assert ranking("<0x0A>", 2) == ["<|im_end|>", "<tool_call>"]
    assert ranking("</tool_call>", 2) == ["<|im_end|>", "<tool_call>"]
    assert ranking("<0x7D>", 1) == ["</tool_call>"]
    assert ranking("▁hello", 1) == ["<0x22>"]
    assert ranking("<tool_call>", 1) == ["<0x22>"]


# -- every kind ------------------------------------------------------------------------------------------------


def test_chat_is_the_default_and_writes_the_same_bytes(tmp_path):
    default = write_tiny_model(tmp_path / "a.gguf", seed=4, extra_vocab=2).read_bytes()
    chat = write_tiny_model(tmp_path / "b.gguf", seed=4, extra_vocab=2, kind="chat").read_bytes()
    assert default == chat
    kv, tensors = read(tmp_path / "a.gguf")
    assert not any(key.startswith("tokenizer.chat_template") for key in kv)
    assert "llama.pooling_type" not in kv and "cls.output.weight" not in tensors
    assert kv["tokenizer.ggml.tokens"][-1] == "▁w1"


@pytest.mark.parametrize("kind", ["reranker", "tools"])
def test_kinds_are_deterministic_per_seed(tmp_path, kind):
    one = write_tiny_model(tmp_path / "one.gguf", kind=kind, seed=7).read_bytes()
    two = write_tiny_model(tmp_path / "two.gguf", kind=kind, seed=7).read_bytes()
    other = write_tiny_model(tmp_path / "other.gguf", kind=kind, seed=8).read_bytes()
    assert one == two != other


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"kind": "embedder"}, "kind must be one of chat, reranker, tools"),
        ({"kind": "tools", "tied_embeddings": True}, "a tools model needs its own output head"),
        ({"kind": "tools", "embedding": 2, "heads": 1, "kv_heads": 1}, "a tools model needs an embedding of more"),
    ],
)
def test_impossible_kinds_raise_value_error_and_leave_nothing(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        write_tiny_model(tmp_path / "bad.gguf", **arguments)
    assert list(tmp_path.iterdir()) == []


def test_ctl_generate_offers_every_kind(tmp_path, capsys):
    for kind in KINDS:
        path = tmp_path / f"{kind}.gguf"
        assert ctl_main(["model", "generate", str(path), "--kind", kind, "--seed", "3", "--blocks", "1"]) == 0
        kv, _ = read(path)
        assert kv["general.architecture"] == ("qwen3" if kind == "reranker" else "llama")
        assert kv["general.name"] == kind
        assert (
            path.read_bytes()
            == write_tiny_model(tmp_path / "same.gguf", kind=kind, seed=3, blocks=1, name=kind).read_bytes()
        )
    with pytest.raises(SystemExit) as exit_code:
        ctl_main(["model", "generate", str(tmp_path / "x.gguf"), "--kind", "embedder"])
    assert exit_code.value.code == 2
    assert "invalid choice: 'embedder'" in capsys.readouterr().err
    assert ctl_main(["model", "generate", str(tmp_path / "t.gguf"), "--kind", "tools", "--tied-embeddings"]) == 2
    assert "a tools model needs its own output head" in capsys.readouterr().err
