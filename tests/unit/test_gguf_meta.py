"""supervisor.runtime.gguf_meta: the facts the estimator reads from real (tiny) GGUF files."""

from __future__ import annotations

import struct
import time

import gguf
import numpy as np
import pytest

from supervisor.core.errors import EXIT_BAD_INPUT, BadRequest, ModelFileUnreadable
from supervisor.runtime.gguf_meta import _swa_layers, read_gguf_facts, read_header
from supervisor.runtime.tinygguf import WORDS, write_tiny_model

F32 = 4


def expected_bytes(embedding, blocks, heads, kv_heads, ffn, vocab):
    """Tensor bytes of tinygguf's layout: (input, per block, output), all float32."""
    kv = kv_heads * (embedding // heads)
    block = (
        2 * embedding  # attn_norm, ffn_norm
        + 2 * embedding * embedding  # attn_q, attn_output
        + 2 * kv * embedding  # attn_k, attn_v
        + 3 * ffn * embedding
    ) * F32  # ffn_gate, ffn_up, ffn_down
    return vocab * embedding * F32, block, (embedding + vocab * embedding) * F32


SHAPES = [
    # embedding, blocks, heads, kv_heads, feed_forward, extra_vocab
    (64, 2, 4, 2, None, 0),
    (32, 1, 4, 4, None, 0),
    (96, 3, 8, 1, 100, 10),
    (128, 4, 8, 2, 200, 300),
]


@pytest.mark.parametrize("embedding, blocks, heads, kv_heads, feed_forward, extra_vocab", SHAPES)
def test_facts_of_tiny_models(tmp_path, embedding, blocks, heads, kv_heads, feed_forward, extra_vocab):
    path = write_tiny_model(
        tmp_path / "m.gguf",
        embedding=embedding,
        blocks=blocks,
        heads=heads,
        kv_heads=kv_heads,
        feed_forward=feed_forward,
        extra_vocab=extra_vocab,
        context=1024,
    )
    facts = read_gguf_facts(path)
    vocab = 3 + 256 + len(WORDS) + extra_vocab
    ffn = feed_forward or 2 * embedding
    input_bytes, block_bytes, output_bytes = expected_bytes(embedding, blocks, heads, kv_heads, ffn, vocab)
    assert facts.architecture == "llama"
    assert facts.block_count == blocks
    assert facts.embedding == embedding
    assert facts.feed_forward == ffn
    assert facts.head_count == heads
    assert facts.head_count_kv == (kv_heads,) * blocks
    assert facts.key_length == facts.value_length == embedding // heads
    assert facts.vocab_size == vocab
    assert facts.context_train == 1024
    assert facts.sliding_window == 0
    assert facts.swa_layers == (False,) * blocks
    assert facts.layer_bytes == (block_bytes,) * blocks
    assert facts.input_bytes == input_bytes
    assert facts.output_bytes == output_bytes
    assert facts.weight_bytes == input_bytes + blocks * block_bytes + output_bytes
    assert facts.tied_output_bytes == 0  # it has an output.weight of its own


@pytest.mark.parametrize("extra_vocab", [0, 1000])
def test_a_tied_head_is_the_token_embedding_counted_once_more(tmp_path, extra_vocab):
    # No output.weight: llama.cpp duplicates token_embd as the head (TENSOR_DUPLICATED), so the
    # facts carry its bytes for the GPU, while the file's own bytes stay those of each tensor once.
    path = write_tiny_model(tmp_path / "tied.gguf", tied_embeddings=True, extra_vocab=extra_vocab)
    facts = read_gguf_facts(path)
    vocab = 311 + extra_vocab
    assert facts.input_bytes == facts.tied_output_bytes == vocab * 64 * F32
    assert facts.output_bytes == 64 * F32  # the output norm alone
    assert facts.weight_bytes == facts.input_bytes + 2 * 147_968 + 64 * F32


def test_default_tiny_model_in_numbers(tmp_path):
    facts = read_gguf_facts(write_tiny_model(tmp_path / "m.gguf"))
    # vocab 3 + 256 + 52 = 311; block (128 + 8192 + 4096 + 24576) × 4 = 147_968
    assert len(WORDS) == 52
    assert (facts.vocab_size, facts.layer_bytes, facts.input_bytes, facts.output_bytes) == (
        311,
        (147_968, 147_968),
        79_616,
        79_872,
    )
    assert facts.weight_bytes == 455_424


def test_sliding_window_and_per_layer_kv_heads_from_the_header(tmp_path):
    path = tmp_path / "swa.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(3)
    writer.add_embedding_length(32)
    writer.add_head_count(4)
    writer.add_head_count_kv([2, 1, 2])
    writer.add_sliding_window(128)
    writer.add_sliding_window_pattern([True, False, True])
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 8), np.float32))  # 128 bytes
    writer.add_tensor("blk.2.attn_q.weight", np.zeros((2,), np.float32))  # 8 bytes
    writer.add_tensor("token_embd.weight", np.zeros((3, 8), np.float16))  # 48 bytes
    writer.add_tensor("output.weight", np.zeros((5,), np.float32))  # 20 bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    facts = read_gguf_facts(path)
    assert facts.architecture == "gemma3"
    assert facts.head_count_kv == (2, 1, 2)
    assert facts.key_length == facts.value_length == 8
    assert facts.sliding_window == 128
    assert facts.swa_layers == (True, False, True)
    assert (facts.layer_bytes, facts.input_bytes, facts.output_bytes) == ((128, 0, 8), 48, 20)
    assert facts.tied_output_bytes == 0


T, F = True, False


@pytest.mark.parametrize(
    "arch, blocks, window, pattern, expected",
    [
        ("gemma3", 6, 0, [T] * 6, (F,) * 6),  # no window: nothing slides
        ("llama", 3, 0, None, (F, F, F)),
        ("unknown", 2, 0, 4, (F, F)),
        ("llama", 4, 512, [T, T, F, T], (T, T, F, T)),  # explicit per-layer list
        ("llama", 3, 512, [1, 0, 1], (T, F, T)),
        ("gemma3", 4, 512, [F, T, T, F], (F, T, T, F)),  # a list wins over the architecture's rule
        ("llama", 6, 512, 3, (T, T, F, T, T, F)),  # int N: every Nth layer (1-based) is full
        ("llama", 5, 512, 2, (T, F, T, F, T)),
        ("llama", 3, 512, 1, (F, F, F)),
        ("gemma3", 4, 512, 2, (T, F, T, F)),  # an int pattern wins over the architecture's
        ("gemma3", 12, 1024, None, (T, T, T, T, T, F, T, T, T, T, T, F)),  # gemma3: every 6th is full
        ("gemma2", 4, 4096, None, (T, F, T, F)),
        ("cohere2", 8, 4096, None, (T, T, T, F, T, T, T, F)),
        ("mistral", 3, 4096, None, (T, T, T)),  # unknown architecture, no pattern: all slide
        ("llama", 0, 4096, None, ()),
    ],
)
def test_swa_layers(arch, blocks, window, pattern, expected):
    assert _swa_layers(arch, blocks, window, pattern) == expected


TINY_HEADER = b"GGUF"


@pytest.mark.parametrize(
    "content",
    [
        b"this is not a GGUF file, only text\n" * 20,
        b"",
        b"\x00" * 64,
        TINY_HEADER,  # the magic alone, cut short
        TINY_HEADER + b"\x03\x00\x00\x00",  # magic and version, no counts
    ],
    ids=["text", "empty", "zeros", "magic-only", "magic-and-version"],
)
def test_not_a_gguf_file_is_an_unreadable_model_file_naming_it(tmp_path, content):
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelFileUnreadable) as caught:
        read_gguf_facts(path)
    assert str(path) in caught.value.message and caught.value.path == path


@pytest.mark.parametrize("keep", [24, 100, 5000])
def test_truncated_model_is_an_unreadable_model_file_naming_it(tmp_path, keep):
    whole = write_tiny_model(tmp_path / "whole.gguf").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(whole[:keep])
    with pytest.raises(ModelFileUnreadable) as caught:
        read_gguf_facts(path)
    assert str(path) in caught.value.message


def test_missing_file_is_an_unreadable_model_file_naming_it(tmp_path):
    path = tmp_path / "absent.gguf"
    with pytest.raises(ModelFileUnreadable) as caught:
        read_gguf_facts(path)
    assert str(path) in caught.value.message


def test_an_unreadable_model_file_is_the_operators_input_not_a_bad_request(tmp_path):
    """The catalog names the file: a client's request is not at fault, and a proxy client is not told the path."""
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not GGUF")
    with pytest.raises(ModelFileUnreadable) as caught:
        read_gguf_facts(path)
    error = caught.value
    assert not isinstance(error, BadRequest)
    assert (error.code, error.http_status, error.exit_code, error.client_safe) == (
        "model_file_unreadable",
        503,
        EXIT_BAD_INPUT,
        False,
    )
    assert error.message == f"cannot read GGUF file {path}: not a GGUF file (no GGUF magic)"


def test_the_header_reader_agrees_with_the_gguf_package_on_every_field_and_tensor(tmp_path):
    # Our reader walks the header itself (the gguf package's took 6 s on a 150k vocabulary): same answers.
    import gguf
    import numpy as np
    from gguf.quants import quantize

    path = tmp_path / "mixed.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(2)
    writer.add_uint32("gemma3.attention.sliding_window", 512)
    writer.add_array("gemma3.attention.head_count_kv", [4, 2])
    writer.add_array("gemma3.attention.sliding_window_pattern", [True, False])
    writer.add_float32("gemma3.rope.freq_base", 10000.0)
    writer.add_bool("general.flag", True)
    writer.add_token_list(["a", "bb", "ccc", "é"])
    writer.add_token_scores([0.0, -1.0, -2.0, -3.0])
    writer.add_tensor("token_embd.weight", np.ones((4, 64), np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.ones((64, 64), np.float16))
    q8 = quantize(np.ones((64, 64), np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.1.attn_q.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    fields, tensors = read_header(path)
    reader = gguf.GGUFReader(str(path))
    theirs = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    theirs["tokenizer.ggml.tokens"] = len(theirs["tokenizer.ggml.tokens"])  # string arrays: counted, not read
    assert fields == theirs  # the floats chosen are exact in f32
    assert tensors == [(t.name, int(t.n_bytes)) for t in reader.tensors]
    assert dict(tensors)["blk.1.attn_q.weight"] == 64 * 64 // 32 * 34  # Q8_0: 34 bytes a block of 32


def _raw_header(kv_count: int, tensor_count: int, body: bytes) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensor_count, kv_count) + body


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


@pytest.mark.parametrize(
    "content, problem",
    [
        (_raw_header(2**60, 0, b""), "keys and 0 tensors cannot fit"),
        (_raw_header(0, 2**59, b""), "tensors cannot fit"),
        (
            _raw_header(1, 0, _key("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**40)),
            "a string array of 1099511627776 items cannot fit",
        ),
        (
            _raw_header(1, 0, _key("llama.attention.head_count_kv") + struct.pack("<IIQ", 9, 4, 2**40)),
            "an array of 1099511627776 items cannot fit",
        ),
        (
            _raw_header(
                1,
                1,
                _key("general.architecture")
                + struct.pack("<IQ", 8, 5)
                + b"llama"
                + _key("blk.0.w")
                + struct.pack("<I", 2**20),
            ),
            "dimensions (at most 4)",
        ),
    ],
    ids=["keys", "tensors", "string-array", "numeric-array", "dimensions"],
)
def test_a_crafted_header_is_refused_at_once_without_allocating(tmp_path, content, problem):
    path = tmp_path / "crafted.gguf"
    path.write_bytes(content)
    started = time.monotonic()
    with pytest.raises(ModelFileUnreadable) as refused:
        read_gguf_facts(path)
    assert time.monotonic() - started < 1.0
    assert problem in refused.value.message and str(path) in refused.value.message


def test_an_absurd_block_count_is_a_sizing_problem_within_a_second(tmp_path):
    path = write_tiny_model(tmp_path / "deep.gguf")
    data = bytearray(path.read_bytes())
    key = b"llama.block_count"
    at = data.index(key) + len(key) + 4  # the uint32 value after its type
    data[at : at + 4] = struct.pack("<I", 2**31)
    path.write_bytes(bytes(data))
    started = time.monotonic()
    with pytest.raises(ModelFileUnreadable, match="block_count 2147483648 is not plausible"):
        read_gguf_facts(path)
    assert time.monotonic() - started < 1.0
