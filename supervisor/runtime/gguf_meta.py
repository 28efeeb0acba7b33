"""Reading what the memory estimator needs from a GGUF file's header.

``read_gguf_facts`` does the I/O: ``read_header`` walks the header and tensor
index of a memory-mapped file, counting but not decoding the large arrays
(a 150k-token vocabulary took the ``gguf`` package's reader 6 s; this takes
tens of milliseconds); ``GgufFacts`` is plain data for the pure estimator.
"""

from __future__ import annotations

import mmap
import re
import struct
from pathlib import Path

from supervisor.core.errors import ModelFileUnreadable
from supervisor.core.gguf_facts import GgufFacts

_LAYER = re.compile(r"^blk\.(\d+)\.")


# Architectures whose GGUF gives a sliding window but no per-layer pattern:
# every Nth layer uses full attention (llama.cpp hard-codes these).
SWA_EVERY = {"gemma2": 2, "gemma3": 6, "cohere2": 4}


def read_gguf_facts(path: Path) -> GgufFacts:
    """What the estimator needs of the file at ``path``; ModelFileUnreadable when it cannot be read as GGUF."""
    try:
        fields, tensors = read_header(path)
    except (OSError, ValueError, struct.error) as exc:  # truncated, foreign, or not there
        raise ModelFileUnreadable(path, str(exc)) from None
    arch = fields.get("general.architecture", "llama")

    def key(name: str, default=None):
        return fields.get(f"{arch}.{name}", default)

    blocks = int(key("block_count", 0))
    if not 0 <= blocks <= MAX_BLOCKS:  # a crafted file must not make every start allocate gigabytes
        raise ModelFileUnreadable(path, f"block_count {blocks} is not plausible (at most {MAX_BLOCKS})")
    embedding = int(key("embedding_length", 0))
    heads = _first(key("attention.head_count", 1))
    kv_heads = key("attention.head_count_kv", heads)
    kv_per_layer = tuple(int(k) for k in kv_heads) if isinstance(kv_heads, list) else (int(kv_heads),) * blocks
    head_dim = embedding // heads if heads else 0
    window = int(key("attention.sliding_window", 0) or 0)
    layer_bytes = [0] * blocks
    input_bytes = output_bytes = 0
    for name, size in tensors:
        match = _LAYER.match(name)
        if match and int(match.group(1)) < blocks:
            layer_bytes[int(match.group(1))] += size
        elif name.startswith("token_embd"):
            input_bytes += size
        else:
            output_bytes += size
    tokens = fields.get("tokenizer.ggml.tokens") or 0  # string arrays are counted, not read
    return GgufFacts(
        architecture=arch,
        block_count=blocks,
        embedding=embedding,
        feed_forward=_first(key("feed_forward_length", embedding * 4)),
        head_count=heads,
        head_count_kv=kv_per_layer,
        key_length=int(key("attention.key_length", head_dim)),
        value_length=int(key("attention.value_length", head_dim)),
        vocab_size=int(key("vocab_size", tokens) or tokens),
        context_train=int(key("context_length", 0)),
        sliding_window=window,
        swa_layers=_swa_layers(arch, blocks, window, key("attention.sliding_window_pattern")),
        layer_bytes=tuple(layer_bytes),
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        tied_output_bytes=_tied_output_bytes(tensors),
    )


def _tied_output_bytes(tensors: list[tuple[str, int]]) -> int:
    """The bytes llama.cpp duplicates as the output head when the file ties it to the token embedding.

    Every architecture that may lack ``output.weight`` falls back to ``token_embd.weight`` with
    TENSOR_DUPLICATED (src/models/*.cpp: load_arch_tensors); an encoder-only file without any head is
    counted too, which only errs on the safe side.
    """
    if any(name == "output.weight" for name, _ in tensors):
        return 0
    return sum(size for name, size in tensors if name == "token_embd.weight")


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


# -- the GGUF header (github.com/ggml-org/ggml/blob/master/docs/gguf.md) ---------------------------------------------

MAX_BLOCKS = 4096  # the deepest real models have a few hundred layers
MAX_DIMS = 4  # GGML_MAX_DIMS
KEPT_ARRAY = 65536  # longer numeric arrays are counted, not read: nothing the estimate needs is that long
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_header(path: Path) -> tuple[dict, list[tuple[str, int]]]:
    """The metadata (arrays of strings as their length; other arrays as lists) and each tensor's (name, bytes).

    Raises ValueError (or struct.error when it is cut short) for anything that is not a GGUF v2/v3 file.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # block and type sizes per tensor type

    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise ValueError("not a GGUF file (no GGUF magic)")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", data, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        # Each key takes at least 13 bytes and each tensor 24: counts beyond that are lies, found at once.
        if kv_count > len(data) // 13 or tensor_count > len(data) // 24:
            raise ValueError(f"{kv_count} keys and {tensor_count} tensors cannot fit in {len(data)} bytes")
        cursor = _Cursor(data, 24)
        fields = {}
        for _ in range(kv_count):
            name = cursor.string()
            fields[name] = cursor.value(cursor.scalar("<I"))
        tensors = []
        for _ in range(tensor_count):
            name = cursor.string()
            n_dims = cursor.scalar("<I")
            if n_dims > MAX_DIMS:
                raise ValueError(f"tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})")
            dims = [cursor.scalar("<Q") for _ in range(n_dims)]
            kind, _offset = cursor.scalar("<I"), cursor.scalar("<Q")
            try:
                block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise ValueError(f"tensor {name} has an unknown type {kind}") from None
            count = 1
            for dim in dims:
                count *= dim
            tensors.append((name, count // block * size))
    return fields, tensors


class _Cursor:
    def __init__(self, data: mmap.mmap, offset: int):
        self.data, self.offset = data, offset

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        if self.offset + length > len(self.data):
            raise ValueError("a string runs past the end of the file (truncated?)")
        text = self.data[self.offset : self.offset + length].decode("utf-8", "replace")
        self.offset += length
        return text

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            left = len(self.data) - self.offset
            if item == _STRING:  # a vocabulary: skip the strings, keep how many
                if count > left // 8:
                    raise ValueError(f"a string array of {count} items cannot fit in the {left} bytes left")
                for _ in range(count):
                    length = self.scalar("<Q")  # read first: it moves the cursor past the length
                    self.offset += length
                if self.offset > len(self.data):
                    raise ValueError("a string array runs past the end of the file (truncated?)")
                return count
            if item not in _SCALARS:
                raise ValueError(f"unsupported GGUF array type {item}")
            fmt = _SCALARS[item]
            width = struct.calcsize(fmt)
            if count * width > left:
                raise ValueError(f"an array of {count} items cannot fit in the {left} bytes left")
            if count > KEPT_ARRAY:
                self.offset += width * count
                return count
            values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.data, self.offset))
            self.offset += width * count
            return values
        if kind not in _SCALARS:
            raise ValueError(f"unsupported GGUF value type {kind}")
        return self.scalar(_SCALARS[kind])
