"""The part of Ollama's HTTP API localllm uses, and a pure memory estimate from ``/api/show``.

Presence is ``/api/tags``; a missing model is pulled with ``/api/pull`` (NDJSON
progress); load is ``/api/generate`` with an empty prompt and ``keep_alive``;
unload is the same with ``keep_alive: 0``; memory is ``/api/ps``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import aiohttp

from .config import same_tag
from .errors import ModelStartFailed

TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=600)  # a load may read a large file
QUICK = aiohttp.ClientTimeout(total=10, sock_connect=5)  # unloads, lists: a server that takes longer is hung
PULL = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=300)  # between two progress lines
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, ValueError)  # ValueError: an answer that is not JSON
BITS_PER_WEIGHT = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.6, "Q5_K_M": 5.7, "Q5_K_S": 5.5,
                   "Q5_0": 5.5, "Q5_1": 6.0, "Q4_K_M": 4.85, "Q4_K_S": 4.6, "Q4_0": 4.5, "Q4_1": 5.0,
                   "Q3_K_M": 3.9, "Q3_K_S": 3.5, "Q3_K_L": 4.3, "Q2_K": 3.35, "IQ4_NL": 4.5, "IQ4_XS": 4.25}


class OllamaApi:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, model: str):
        self.session = session
        self.base_url = base_url
        self.model = model  # the catalog name, for errors

    async def _post(self, path: str, body: dict, timeout: aiohttp.ClientTimeout = TIMEOUT) -> dict:
        try:
            async with self.session.post(self.base_url + path, json=body, timeout=timeout) as response:
                answer = await response.json(content_type=None)
        except TRANSPORT_ERRORS as exc:
            raise ModelStartFailed(self.model, f"Ollama {path} did not answer: {exc!r}") from None
        if not isinstance(answer, dict):
            raise ModelStartFailed(self.model, f"Ollama {path}: unexpected answer {str(answer)[:200]}")
        if response.status >= 400 or "error" in answer:
            raise ModelStartFailed(self.model, f"Ollama {path}: {answer.get('error', f'HTTP {response.status}')}")
        return answer

    async def _get(self, path: str) -> dict:
        try:
            async with self.session.get(self.base_url + path, timeout=QUICK) as response:
                if response.status >= 400:
                    raise ModelStartFailed(self.model, f"Ollama {path}: HTTP {response.status}")
                answer = await response.json(content_type=None)
        except TRANSPORT_ERRORS as exc:
            raise ModelStartFailed(self.model, f"Ollama {path} did not answer: {exc!r}") from None
        if not isinstance(answer, dict):
            raise ModelStartFailed(self.model, f"Ollama {path}: unexpected answer {str(answer)[:200]}")
        return answer

    async def has(self, tag: str) -> bool:
        return any(same_tag(tag, m.get("name", "")) for m in (await self._get("/api/tags")).get("models", []))

    async def pull(self, tag: str, progress: Callable[[dict], None]) -> None:
        """Pull ``tag``; ``progress`` gets each NDJSON status line (``status``, ``total``, ``completed``)."""
        try:
            async with self.session.post(self.base_url + "/api/pull", json={"model": tag, "stream": True},
                                         timeout=PULL) as response:
                if response.status >= 400:
                    detail = (await response.text())[:500]
                    raise ModelStartFailed(self.model,
                                           f"Ollama could not pull '{tag}': HTTP {response.status} {detail}")
                last = {}
                async for line in response.content:
                    if not line.strip():
                        continue
                    last = json.loads(line)
                    if "error" in last:
                        raise ModelStartFailed(self.model, f"Ollama could not pull '{tag}': {last['error']}")
                    progress(last)
        except TRANSPORT_ERRORS as exc:
            raise ModelStartFailed(self.model, f"Ollama's pull of '{tag}' broke off: {exc!r}") from None
        if last.get("status") != "success":
            raise ModelStartFailed(self.model, f"Ollama's pull of '{tag}' ended without success: {last}")

    async def load(self, tag: str, context: int) -> None:
        await self._post("/api/generate", {"model": tag, "prompt": "", "keep_alive": -1, "stream": False,
                                           "options": {"num_ctx": context}})

    async def unload(self, tag: str) -> None:
        await self._post("/api/generate", {"model": tag, "prompt": "", "keep_alive": 0, "stream": False}, QUICK)

    async def loaded(self) -> dict[str, dict]:
        """``/api/ps``: the loaded models by name."""
        return {m["name"]: m for m in (await self._get("/api/ps")).get("models", []) if "name" in m}

    async def show(self, tag: str) -> dict:
        return await self._post("/api/show", {"model": tag})


def find_loaded(loaded: dict[str, dict], tag: str) -> dict | None:
    return next((entry for name, entry in loaded.items() if same_tag(name, tag)), None)


def memory_in_use(entry: dict, on_gpu: bool) -> int | None:
    """Bytes the loaded model uses where it is budgeted: ``size_vram`` on a GPU profile, ``size`` otherwise."""
    value = entry.get("size_vram" if on_gpu else "size")
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def offload_of(entry: dict) -> tuple[int, int]:
    """``/api/ps``'s (size_vram, size) of a loaded model, in bytes; 0 for what it leaves out.

    On a GPU host ``size_vram < size`` means Ollama put part of the model on the CPU (it did not
    fit what Ollama thought was free); ``size_vram == 0``, all of it.
    """
    def number(key: str) -> int:
        value = entry.get(key)
        return int(value) if isinstance(value, (int, float)) and value > 0 else 0

    return number("size_vram"), number("size")


def estimate_from_show(show: dict, context: int, parallel: int = 1) -> int | None:
    """Pure: weights from the parameter count and quantization, plus an f16 KV cache for ``context`` tokens.

    None when ``/api/show`` lacks what it takes (no parameter count, unknown quantization).
    """
    details, info = show.get("details") or {}, show.get("model_info") or {}
    parameters = info.get("general.parameter_count") or _parse_parameter_size(details.get("parameter_size", ""))
    bits = BITS_PER_WEIGHT.get(str(details.get("quantization_level", "")).upper())
    if not parameters or not bits:
        return None
    weights = parameters * bits / 8
    arch = info.get("general.architecture", "")
    layers, width = info.get(f"{arch}.block_count"), info.get(f"{arch}.embedding_length")
    heads, kv_heads = info.get(f"{arch}.attention.head_count"), info.get(f"{arch}.attention.head_count_kv")
    kv = 0
    if layers and width and heads:
        kv_width = width * (kv_heads or heads) / heads
        kv = 2 * layers * kv_width * context * parallel * 2  # K and V, f16
    return int(weights + kv)


def _parse_parameter_size(text: str) -> float | None:
    match = re.match(r"^\s*([\d.]+)\s*([KMBT])\s*$", text.upper())
    if not match:
        return None
    return float(match.group(1)) * {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[match.group(2)]
