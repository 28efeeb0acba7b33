"""The part of Ollama's HTTP API localllm uses, and pure readings of ``/api/show``: memory, context, capabilities.

Presence is ``/api/tags``; a missing model is pulled with ``/api/pull`` (NDJSON progress, with silent phases).
A load is ``/api/generate`` with an empty prompt and ``keep_alive: -1``, or ``/api/embed`` with no input for an
embedding model (which cannot generate). An unload is ``keep_alive: 0``, which Ollama only queues: the model is
gone when ``/api/ps`` stops listing it (``wait_gone``). Memory is ``/api/ps``. File names in comments are
Ollama's source (server/routes.go, server/sched.go, fs/ggml/ggml.go, types/model/name.go).

Every call has a deadline. One that waits on a model's load (a load, the unload of a model still loading, ``/api/ps``
while any model loads, a pull's silent phases) is given as long as that may take, by its caller or the constants
below; any other (``/api/tags``, ``/api/show``) is given ``daemon.timeouts.ollama``, and connecting,
``daemon.timeouts.upstream_connect`` (``OllamaApi.timeouts``, from the session: ``upstream.timeouts_of``).

A call Ollama does not answer, or answers with an error, raises OllamaFailure; a load or pull that fails is the
model's start failing, ModelStartFailed; a 503 is Ollama's full queue, QueueFull.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable

import aiohttp

from supervisor.config.settings import Timeouts, same_tag
from supervisor.core.errors import ModelStartFailed, OllamaFailure, QueueFull
from supervisor.runtime.upstream import timeouts_of

LOAD_SILENCE = 600.0  # a load reads the model's file before it answers (its caller bounds the whole load)
# /api/ps waits while Ollama loads any model (sched.go's load holds the new runner's refMu "until running or
# aborted", and PsHandler takes every runner's), so a list asked for during a load takes as long as that load.
LOAD_WAIT = 600.0
# Between two pull progress lines. Ollama is silent for minutes while it checks a big download
# ("verifying sha256 digest" hashes the whole blob) and while it writes the manifest.
PULL_SILENCE = 30 * 60.0
BUSY_RETRY_AFTER = 5  # seconds; Ollama's 503 "server busy" (OLLAMA_MAX_QUEUE) carries no Retry-After
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, ValueError)  # ValueError: an answer that is not JSON
BITS_PER_WEIGHT = {
    "F32": 32,
    "F16": 16,
    "BF16": 16,
    "Q8_0": 8.5,
    "Q6_K": 6.6,
    "Q5_K_M": 5.7,
    "Q5_K_S": 5.5,
    "Q5_0": 5.5,
    "Q5_1": 6.0,
    "Q4_K_M": 4.85,
    "Q4_K_S": 4.6,
    "Q4_0": 4.5,
    "Q4_1": 5.0,
    "Q3_K_M": 3.9,
    "Q3_K_S": 3.5,
    "Q3_K_L": 4.3,
    "Q2_K": 3.35,
    "IQ4_NL": 4.5,
    "IQ4_XS": 4.25,
}
# OLLAMA_KV_CACHE_TYPE's bytes per cached element, as kvCacheBytesPerElement (fs/ggml/ggml.go); others are f16.
KV_CACHE_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 1.0, "q4_0": 0.5}
NUM_CTX = re.compile(r"^\s*num_ctx\s+(\d+)\s*$", re.MULTILINE)  # a line of /api/show's "parameters" ("%-30s %#v")


class OllamaApi:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, model: str, timeouts: Timeouts | None = None):
        self.session = session
        self.base_url = base_url
        self.model = model  # the catalog name, for errors
        self.timeouts = timeouts or timeouts_of(session)

    def _limit(self, total: float | None = None, silence: float | None = None) -> aiohttp.ClientTimeout:
        """A call's deadline: ``total`` for all of it, ``silence`` between two reads; connecting, upstream_connect."""
        return aiohttp.ClientTimeout(total=total, sock_connect=self.timeouts.upstream_connect, sock_read=silence)

    @property
    def quick(self) -> aiohttp.ClientTimeout:
        """A call that does not wait on a load: a server that takes longer than ``timeouts.ollama`` is hung."""
        return self._limit(total=self.timeouts.ollama)

    async def _send(self, path: str, body: dict, timeout: aiohttp.ClientTimeout) -> tuple[int, object]:
        """POST ``body``: the status and the decoded answer (its text when it is not JSON).

        A 503 is Ollama's "server busy" past OLLAMA_MAX_QUEUE (routes.go handleScheduleError): an overload
        to retry, not a model that cannot start.
        """
        try:
            async with self.session.post(self.base_url + path, json=body, timeout=timeout) as response:
                status, retry_after, text = response.status, response.headers.get("Retry-After"), await response.text()
        except TRANSPORT_ERRORS as exc:
            raise OllamaFailure(self.model, f"Ollama {path} did not answer: {exc!r}") from None
        try:
            answer = json.loads(text)
        except ValueError:
            answer = text
        if status == 503:
            detail = answer.get("error", text) if isinstance(answer, dict) else text
            wait = int(retry_after) if retry_after and retry_after.isdigit() else BUSY_RETRY_AFTER
            raise QueueFull(f"Ollama is busy ({path}: {str(detail)[:200]}); try again in {wait}s", wait)
        return status, answer

    def _checked(self, path: str, status: int, answer: object) -> dict:
        if not isinstance(answer, dict):
            raise OllamaFailure(self.model, f"Ollama {path}: unexpected answer {str(answer)[:200]}")
        if status >= 400 or "error" in answer:
            raise OllamaFailure(self.model, f"Ollama {path}: {answer.get('error', f'HTTP {status}')}")
        return answer

    async def _post(self, path: str, body: dict, timeout: aiohttp.ClientTimeout | None = None) -> dict:
        return self._checked(path, *await self._send(path, body, timeout or self.quick))

    async def _get(self, path: str, timeout: aiohttp.ClientTimeout | None = None) -> dict:
        try:
            async with self.session.get(self.base_url + path, timeout=timeout or self.quick) as response:
                if response.status >= 400:
                    raise OllamaFailure(self.model, f"Ollama {path}: HTTP {response.status}")
                answer = await response.json(content_type=None)
        except TRANSPORT_ERRORS as exc:
            raise OllamaFailure(self.model, f"Ollama {path} did not answer: {exc!r}") from None
        if not isinstance(answer, dict):
            raise OllamaFailure(self.model, f"Ollama {path}: unexpected answer {str(answer)[:200]}")
        return answer

    async def has(self, tag: str) -> bool:
        return any(same_tag(tag, m.get("name", "")) for m in (await self._get("/api/tags")).get("models", []))

    async def pull(self, tag: str, progress: Callable[[dict], None], silence: float = PULL_SILENCE) -> None:
        """Pull ``tag``; ``progress`` gets each NDJSON status line (``status``, ``total``, ``completed``).

        ``silence`` is how many seconds may pass between two lines before the pull counts as stuck; the
        default allows Ollama's silent phases (verifying a big download's digest takes minutes).
        """
        timeout = self._limit(silence=silence)
        try:
            async with self.session.post(
                self.base_url + "/api/pull", json={"model": tag, "stream": True}, timeout=timeout
            ) as response:
                if response.status >= 400:
                    detail = (await response.text())[:500]
                    raise ModelStartFailed(
                        self.model, f"Ollama could not pull '{tag}': HTTP {response.status} {detail}"
                    )
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

    async def load(self, tag: str, context: int | None, embedding: bool = False) -> None:
        """Load ``tag`` to stay (``keep_alive: -1``) with ``context`` tokens per slot.

        ``context`` None sends no ``num_ctx``: the Modelfile's, else OLLAMA_CONTEXT_LENGTH, applies, as it
        does for ``/v1`` requests, which never send one (a differing num_ctx makes Ollama reload the model).
        An embedding model answers ``/api/generate`` with 400 "does not support generate"; ``/api/embed``
        with no input loads it and answers with no embeddings, computing nothing (routes.go EmbedHandler).
        Raises ModelStartFailed when Ollama refuses it or does not answer, QueueFull when Ollama's queue is full.
        """
        body: dict = {"model": tag, "keep_alive": -1}
        if context is not None:
            body["options"] = {"num_ctx": context}
        loading = self._limit(silence=LOAD_SILENCE)
        try:
            if embedding:
                await self._post("/api/embed", body, loading)
            else:
                await self._post("/api/generate", {**body, "prompt": "", "stream": False}, loading)
        except OllamaFailure as exc:
            raise ModelStartFailed(self.model, exc.message) from None

    async def unload(self, tag: str, timeout: float | None = None) -> None:
        """Ask Ollama to unload ``tag``; it only queues that (routes.go: expireRunner): see ``wait_gone``.

        A 404 ("model not found": never pulled, or its manifest deleted) is nothing to unload. Ollama cannot
        unload a model it no longer finds even if a runner still holds it: ``wait_gone`` then times out.
        The unload of a model still loading waits for that load to run or abort (expireRunner takes the
        runner's lock): after a failed or cancelled load, give it as long as a load may take.
        """
        body = {"model": tag, "prompt": "", "keep_alive": 0, "stream": False}
        status, answer = await self._send("/api/generate", body, self._limit(total=timeout or self.timeouts.ollama))
        if status != 404:
            self._checked("/api/generate", status, answer)

    async def wait_gone(self, tag: str, timeout: float) -> bool:
        """Poll ``/api/ps`` until it no longer lists ``tag``; False when ``timeout`` seconds pass first.

        The runner stops after its in-flight requests, and Ollama then waits up to 5 s for the memory to
        come back (sched.go), so the memory is free only then. The pause grows from 0.1 s to 0.5 s.
        Raises OllamaFailure when Ollama does not answer at all.
        """
        loop = asyncio.get_running_loop()
        deadline, pause = loop.time() + timeout, 0.1
        while (left := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(left):
                    listed = await self.loaded(timeout=left + 1)  # the outer deadline cuts it off first
            except TimeoutError:
                return False
            if find_loaded(listed, tag) is None:
                return True
            await asyncio.sleep(min(pause, max(deadline - loop.time(), 0)))
            pause = min(pause * 2, 0.5)
        return False

    async def loaded(self, timeout: float = LOAD_WAIT) -> dict[str, dict]:
        """``/api/ps``: the loaded models by name. It waits while Ollama loads any model, hence ``timeout``."""
        answer = await self._get("/api/ps", self._limit(total=timeout))
        return {m["name"]: m for m in answer.get("models", []) if "name" in m}

    async def show(self, tag: str) -> dict:
        """``/api/show``. Ollama leaves every array out of ``model_info`` (null) unless asked for the verbose
        answer (routes.go getModelData), so a model with per-layer head counts is asked again, verbosely."""
        answer = await self._post("/api/show", {"model": tag})
        if _elided_head_counts(answer.get("model_info") or {}):
            answer = await self._post("/api/show", {"model": tag, "verbose": True})
        return answer


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


def loaded_context(entry: dict) -> int | None:
    """``/api/ps``'s ``context_length`` of a loaded model: the context per slot it runs with (None: not said)."""
    return _count(entry.get("context_length"))


def capabilities(show: dict) -> set[str]:
    """``/api/show``'s capabilities; an Ollama too old to say has only completion models."""
    listed = show.get("capabilities")
    return {str(c) for c in listed} if isinstance(listed, list) and listed else {"completion"}


def embedding_only(show: dict) -> bool:
    """The model loads through ``/api/embed``: it embeds and cannot generate."""
    found = capabilities(show)
    return "embedding" in found and "completion" not in found


def context_from_show(show: dict) -> int | None:
    """The Modelfile's ``num_ctx`` (``/api/show``'s parameters text), which wins over OLLAMA_CONTEXT_LENGTH."""
    match = NUM_CTX.search(str(show.get("parameters") or ""))
    return int(match.group(1)) if match else None


def training_context(show: dict) -> int | None:
    """``<arch>.context_length``: Ollama caps a larger num_ctx at it (llm/server.go)."""
    return _count(_arch(show.get("model_info") or {}, "context_length"))


def estimate_from_show(show: dict, context: int, parallel: int = 1, cache_type: str = "f16") -> int | None:
    """Pure: weights from the parameter count and quantization, plus the KV cache as Ollama sizes it.

    Ollama runs ``context`` (capped at the training context) cells for each of ``parallel`` slots, with
    OLLAMA_KV_CACHE_TYPE ``cache_type``. None when ``/api/show`` lacks what it takes: no parameter count,
    an unknown quantization, or head counts it left out (a verbose ``show`` has them).
    """
    details, info = show.get("details") or {}, show.get("model_info") or {}
    parameters = info.get("general.parameter_count") or _parse_parameter_size(details.get("parameter_size", ""))
    bits = BITS_PER_WEIGHT.get(str(details.get("quantization_level", "")).upper())
    if not parameters or not bits:
        return None
    training = training_context(show)
    kv = kv_cache_bytes(info, min(context, training) if training else context, parallel, cache_type)
    return None if kv is None else int(parameters * bits / 8 + kv)


def kv_cache_bytes(info: dict, context: int, parallel: int, cache_type: str = "f16") -> int | None:
    """Pure: GraphSize's KV cache (fs/ggml/ggml.go) from ``model_info``; None when a head count was left out.

    A layer with heads and KV heads caches K and V (``key_length`` + ``value_length`` wide, by default the
    embedding over the fewest heads) per KV head for every cell; any other layer is recurrent and keeps
    an f32 state of fixed size. No ``block_count`` (an old Ollama): no layers to count.
    """
    layers = _count(_arch(info, "block_count")) or 0
    heads = _per_layer(info, "attention.head_count", layers)
    kv_heads = _per_layer(info, "attention.head_count_kv", layers)
    if heads is None or kv_heads is None:
        return None
    fewest_heads = min(_values(_arch(info, "attention.head_count", 1)))  # EmbeddingHeadCountMax's divisor
    head_width = (_count(_arch(info, "embedding_length")) or 0) // fewest_heads if fewest_heads > 0 else 0
    key_width = _count(_arch(info, "attention.key_length")) or head_width
    value_width = _count(_arch(info, "attention.value_length")) or head_width
    per_element = KV_CACHE_BYTES.get(cache_type.lower(), 2.0)
    cells = context * max(parallel, 1)
    total = 0
    for layer_heads, layer_kv_heads in zip(heads, kv_heads, strict=True):
        if layer_heads > 0 and layer_kv_heads > 0:
            total += int(cells * (key_width + value_width) * layer_kv_heads * per_element)
        else:
            total += _recurrent_state(info)
    return total


def _recurrent_state(info: dict) -> int:
    """A recurrent (SSM) layer's f32 state, as GraphSize counts it: it does not grow with the context."""
    conv, state, inner, groups = (
        _count(_arch(info, f"ssm.{key}")) or 0 for key in ("conv_kernel", "state_size", "inner_size", "group_count")
    )
    rolling = (conv - 1) * (inner + 2 * groups * state) if conv > 0 else 0
    return (rolling + state * inner) * 4


def _per_layer(info: dict, key: str, layers: int) -> list[int] | None:
    """KV.HeadCount's reading: a number is every layer's; an array is each layer's, layers past its end
    taking its only element, else 1; absent is 1. None when Ollama elided the array (null, or [] before)."""
    values = _values(_arch(info, key, 1))
    if not values:
        return None
    fill = values[0] if len(values) == 1 else 1
    return [values[i] if i < len(values) else fill for i in range(layers)]


def _values(value: object) -> list[int]:
    """A number or an array of numbers as a list; [] for anything else (null, an elided array)."""
    if _whole(value):
        return [int(value)]
    if isinstance(value, list) and all(_whole(v) for v in value):
        return [int(v) for v in value]
    return []


def _whole(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def _elided_head_counts(info: dict) -> bool:
    return any(_arch(info, key, 1) in (None, []) for key in ("attention.head_count", "attention.head_count_kv"))


def _arch(info: dict, key: str, default: object = None) -> object:
    """``<general.architecture>.<key>``, the way Ollama's KV prefixes its keys."""
    return info.get(f"{info.get('general.architecture', '')}.{key}", default)


def _count(value: object) -> int | None:
    """A positive number from JSON as an int, else None (``bool`` is not one)."""
    return int(value) if _whole(value) and value > 0 else None


def _parse_parameter_size(text: str) -> float | None:
    match = re.match(r"^\s*([\d.]+)\s*([KMBT])\s*$", text.upper())
    if not match:
        return None
    return float(match.group(1)) * {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[match.group(2)]
