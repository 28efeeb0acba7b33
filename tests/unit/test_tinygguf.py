"""supervisor.runtime.tinygguf: the random-weight llama models read back with gguf's own reader."""

from __future__ import annotations

import gc

import gguf
import pytest

from supervisor.runtime.tinygguf import SPECIAL_TOKENS, WORDS, write_tiny_model

VOCAB = len(SPECIAL_TOKENS) + 256 + len(WORDS)


def fields(path):
    reader = gguf.GGUFReader(path)
    return reader, {name: field.contents() for name, field in reader.fields.items()}


@pytest.mark.parametrize(
    "blocks, embedding, heads, kv_heads, context",
    [
        (1, 32, 4, 4, 256),
        (2, 64, 4, 2, 2048),
        (3, 96, 8, 1, 4096),
    ],
)
def test_written_model_reads_back(tmp_path, blocks, embedding, heads, kv_heads, context):
    path = write_tiny_model(
        tmp_path / "sub" / "tiny.gguf",
        blocks=blocks,
        embedding=embedding,
        heads=heads,
        kv_heads=kv_heads,
        context=context,
        name="tiny-test",
    )
    assert path == tmp_path / "sub" / "tiny.gguf"
    reader, kv = fields(path)
    assert kv["general.architecture"] == "llama"
    assert kv["general.name"] == "tiny-test"
    assert kv["llama.block_count"] == blocks
    assert kv["llama.embedding_length"] == embedding
    assert kv["llama.attention.head_count"] == heads
    assert kv["llama.attention.head_count_kv"] == kv_heads
    assert kv["llama.context_length"] == context
    assert kv["llama.feed_forward_length"] == 2 * embedding
    assert kv["llama.rope.dimension_count"] == embedding // heads
    assert len(kv["tokenizer.ggml.tokens"]) == VOCAB
    assert len(reader.tensors) == 3 + 9 * blocks
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert shapes["token_embd.weight"] == [embedding, VOCAB]
    assert shapes[f"blk.{blocks - 1}.attn_k.weight"] == [embedding, kv_heads * embedding // heads]
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf"]


def test_tied_embeddings_leave_out_the_output_head(tmp_path):
    reader, _ = fields(write_tiny_model(tmp_path / "tied.gguf", tied_embeddings=True))
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names
    assert {"token_embd.weight", "output_norm.weight"} <= names
    assert len(reader.tensors) == 2 + 9 * 2
    untied, _ = fields(write_tiny_model(tmp_path / "untied.gguf"))
    assert "output.weight" in {t.name for t in untied.tensors}


def test_a_150k_vocabulary_is_written_whole(tmp_path):
    # As the GPU bench writes it: a vocabulary the size of Qwen's, with a tied head. (gguf's reader takes
    # seconds over 150k strings, so the file is checked by its bytes.)
    path = write_tiny_model(tmp_path / "big.gguf", tied_embeddings=True, extra_vocab=150_000)
    data = path.read_bytes()
    vocab = VOCAB + 150_000
    last = "▁w149999".encode()
    assert data.count(last) == 1 and data.find(last) < data.find(b"token_embd.weight")
    assert (13).to_bytes(8, "little") + b"output.weight" not in data  # as a tensor name of its own
    tensors = (vocab * 64 + 64 + 2 * (2 * 64 + 2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)) * 4
    assert tensors < len(data) < tensors + 4 * 1024 * 1024  # the rest: the header, mostly the 150k tokens


def test_feed_forward_length_can_be_chosen(tmp_path):
    _, kv = fields(write_tiny_model(tmp_path / "t.gguf", feed_forward=100))
    assert kv["llama.feed_forward_length"] == 100


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    one = write_tiny_model(tmp_path / "one.gguf", seed=7).read_bytes()
    two = write_tiny_model(tmp_path / "two.gguf", seed=7).read_bytes()
    other = write_tiny_model(tmp_path / "three.gguf", seed=8).read_bytes()
    assert one == two
    assert one != other
    assert len(one) == len(other)


@pytest.mark.parametrize(
    "shape",
    [
        {"embedding": 66, "heads": 4},
        {"embedding": 64, "heads": 4, "kv_heads": 3},
        {"embedding": 64, "heads": 3},
    ],
)
def test_indivisible_shapes_raise_value_error(tmp_path, shape):
    with pytest.raises(ValueError, match="embedding must divide by heads, and heads by kv_heads"):
        write_tiny_model(tmp_path / "bad.gguf", **shape)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "shape",
    [
        {"blocks": -1},
        {"embedding": 0},
        {"heads": 0},
        {"context": -1},
    ],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()),
)
def test_non_positive_sizes_raise_value_error_and_leave_nothing(tmp_path, shape):
    try:
        write_tiny_model(tmp_path / "bad.gguf", **shape)
        outcome = "no error"
    except ValueError:
        outcome = "ValueError"
    except Exception as exc:  # noqa: BLE001 - reported below, with the traceback dropped here
        outcome = f"{type(exc).__name__}: {exc}"
    try:
        assert outcome == "ValueError"
        assert list(tmp_path.iterdir()) == []
    finally:
        gc.collect()  # a writer a failed write left open is reported against this test, not a later one
