"""A STAND-IN for Ollama, for tests only: it is NOT Ollama and runs no model.

No registry reachable from the test machines ships an Ollama image, so localllm's Ollama backend
is tested against this program instead. It speaks the subset of Ollama's HTTP API (docs/api.md of
ollama/ollama, and its OpenAI-compatible ``/v1`` endpoints) that localllm uses, with the same
request and response shapes, and mirrors, behaviour by behaviour, what Ollama's source
(v0.33.0-rc2: server/routes.go, server/sched.go, server/images.go, middleware/openai.go,
openai/openai.go, api/types.go, llm/llama_server.go, types/model/name.go) does that matters to a
supervisor: a model store on disk that survives restarts, pulls with NDJSON progress, loads and
unloads with ``keep_alive``, one load at a time behind a bounded queue, eviction by count and by
VRAM, partial CPU offload, reloads when ``num_ctx`` changes, capabilities, embeddings, and
``/api/ps`` memory figures. Each behaviour is a setting below, and each function's docstring names
the Ollama file and function it mirrors. The "registry" is a JSON object in ``STANDIN_REGISTRY``;
a pull writes a small manifest into ``OLLAMA_MODELS`` (no weights are ever stored), generated text
is canned tokens and embeddings are a hash of the text. Python standard library only.

Endpoints: ``GET|HEAD /``, ``GET /api/version``, ``GET /api/tags``, ``GET /api/ps``,
``POST /api/pull``, ``POST /api/generate``, ``POST /api/chat``, ``POST /api/embed``,
``POST /api/show``, ``DELETE /api/delete``, ``GET /v1/models``, ``GET /v1/models/{model}``,
``POST /v1/chat/completions``, ``POST /v1/embeddings``; and the stand-in's own, which Ollama does
not have: ``GET /standin/stats`` (counters of loads, reloads, unloads, evictions, pulls..., and the
runners) and ``POST /standin/vram`` (``{"used_elsewhere": bytes}``: memory other processes hold).

Environment (real Ollama's names where it has one):

    OLLAMA_HOST               listen address, default 127.0.0.1:11434 (the image sets 0.0.0.0:11434, as Ollama's does)
    OLLAMA_MODELS             model store, default ~/.ollama/models
    OLLAMA_KEEP_ALIVE         default keep-alive of a load, default 5m; negative = forever
    OLLAMA_NUM_PARALLEL       slots per loaded model (its ``num_ctx`` is multiplied by it), default 1;
                              an embedding-only model always gets 1 (sched.go load)
    OLLAMA_MAX_LOADED_MODELS  a load beyond it evicts a model; 0 (default) = 3 per GPU, as Ollama's
                              defaultModelsPerGPU (the stand-in has at most one GPU, so 3)
    OLLAMA_CONTEXT_LENGTH     ``num_ctx`` of a request that sets none and whose Modelfile sets none, default 2048
                              (Ollama's own default depends on the VRAM: 4096, 32768 or 262144)
    OLLAMA_FLASH_ATTENTION    echoed; with it, OLLAMA_KV_CACHE_TYPE (f16|q8_0|q4_0) scales the KV cache
    OLLAMA_MAX_QUEUE          requests waiting for a load beyond it get 503 "server busy", default 512
    OLLAMA_LOAD_TIMEOUT       a load that takes longer fails, default 5m; 0 or negative = never
    STANDIN_REGISTRY          JSON {"name:tag": {"size": ..., ...}} that pulls can fetch (default: two small models)
    STANDIN_PULL_SECONDS      how long a pull takes, default 1.0
    STANDIN_PULL_SILENT_SECONDS  a silent phase after "verifying sha256 digest" (no line at all), default 0
    STANDIN_LOAD_SECONDS      how long a load takes, default 0.2
    STANDIN_TOKEN_SECONDS     delay per generated token, default 0.01
    STANDIN_GPU               "1": ``size_vram`` = ``size`` in /api/ps; else 0 (a CPU-only host);
                              ignored when STANDIN_VRAM_BYTES is set
    STANDIN_VRAM_BYTES        a GPU with this much memory (0 = none, default): the 80% rule, eviction
                              for room and partial CPU offload (``size_vram < size``) apply
    STANDIN_VRAM_USED_ELSEWHERE  bytes of that GPU held by other processes (e.g. llama.cpp containers),
                              default 0; POST /standin/vram changes it while running
    STANDIN_UNLOAD_SECONDS    keep_alive 0 answers at once and the runner goes from /api/ps this long after
                              its in-flight requests end, as Ollama's runner shutdown does (default 0.5);
                              "off": it unloads before it answers (the old stand-in)
    STANDIN_SERIAL_LOADS      "1" (default): one load at a time, as Ollama; "0": loads in parallel
    STANDIN_PS_WAITS_FOR_LOADS  "1" (default): /api/ps answers only when no load runs, as Ollama; "0": at once
    STANDIN_ABORT_ON_DISCONNECT "1" (default): a load whose client disconnects is aborted, as Ollama; "0": it completes
    STANDIN_CAP_CONTEXT       "1" (default): num_ctx is capped at the model's training context, as Ollama
    STANDIN_STREAM_FAIL_AFTER N: the runner dies after N generated tokens of every answer (unset: never)
    STANDIN_FAIL_START        "1": print an error and exit 1 at start

A loaded model's ``size`` in /api/ps is the model's size plus its KV cache for ``num_ctx * num_parallel``
tokens: ``block_count * head_count_kv * (key_length + value_length) * context * 2`` bytes (f16), where
key_length and value_length default to ``embedding_length / head_count`` and ``head_count_kv`` may
be a per-layer array (then summed), as llama.cpp allocates it.

A registry entry may carry, besides ``size``, ``parameter_size``, ``quantization_level``, ``family``
and the shape (``block_count``, ``embedding_length``, ``head_count``, ``head_count_kv``,
``key_length``, ``value_length``, ``context_length``; ``head_count`` and ``head_count_kv`` may be
arrays, one per layer):

    "capabilities": ["embedding"]   what /api/show lists; default ["completion"]. An embedding-only
                                    model answers /api/generate and /api/chat with 400
    "num_ctx": 8192                 a Modelfile ``PARAMETER num_ctx`` (shown in /api/show's parameters)
    "load_error": "text"            loading it fails with HTTP 500 and that text
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import os
import random
import re
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections import deque
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

VERSION = "0.0.0-standin"
DEFAULT_PORT = 11434
DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
FOREVER_NS = 2**63 - 1  # Go's MaxInt64 duration: what a negative keep_alive becomes
UNSET = object()  # a request without keep_alive: a loaded model keeps its own
CANNED = [
    "Hello",
    " from",
    " the",
    " Ollama",
    " stand",
    "-in",
    ":",
    " no",
    " model",
    " ran",
    ",",
    " these",
    " are",
    " canned",
    " tokens",
    ".",
]
DEFAULT_REGISTRY = {
    "llama3.2:1b": {
        "size": 1321098329,
        "parameter_size": "1.2B",
        "quantization_level": "Q8_0",
        "parameter_count": 1235814432,
        "block_count": 16,
        "embedding_length": 2048,
        "head_count": 32,
        "head_count_kv": 8,
        "context_length": 131072,
    },
    "qwen2.5:0.5b": {
        "size": 397821319,
        "parameter_size": "494.03M",
        "quantization_level": "Q4_K_M",
        "family": "qwen2",
        "parameter_count": 494032768,
        "block_count": 24,
        "embedding_length": 896,
        "head_count": 14,
        "head_count_kv": 2,
        "context_length": 32768,
    },
}
KV_BYTES = {"f16": 2.0, "q8_0": 1.0625, "q4_0": 0.5625}
TEMPLATE = "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}"
NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
GO_DURATION = re.compile(r"^[+-]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+$")
GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
DEFAULT_MODELS_PER_GPU = 3  # server/sched.go defaultModelsPerGPU
SERVER_BUSY = "server busy, please try again.  maximum pending requests exceeded"  # sched.go ErrMaxQueue (two spaces)
RUNNER_DIED = "an error was encountered while running the model: unexpected EOF"  # llm/llama_server.go Completion
LOAD_TIMED_OUT = "timed out waiting for llama-server to start - "  # llm/llama_server.go WaitUntilRunning, no stderr


GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# --------------------------------------------------------------------------------------------- logging

LOG_LOCK = threading.Lock()


def emit_line(line: str) -> None:
    """Write one whole line and flush (print() from several threads can interleave its pieces)."""
    with LOG_LOCK:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def log(level: str, message: str, **fields) -> None:
    """One slog-style line on stdout, as Ollama logs (it logs to stderr; stdout is what the brief asks)."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

    def render(value) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, str) and (" " in value or not value):
            return json.dumps(value)
        return str(value)

    extra = "".join(f" {key}={render(value)}" for key, value in fields.items())
    emit_line(f'time={stamp} level={level} source=standin msg="{message}"{extra}')


def log_request(status: int, elapsed: float, client: str, method: str, path: str) -> None:
    """One line per request, in gin's format (Ollama's HTTP router)."""
    stamp = datetime.now().strftime("%Y/%m/%d - %H:%M:%S")
    took = f"{elapsed * 1e3:.3f}ms" if elapsed < 1 else f"{elapsed:.6f}s"
    emit_line(f'[GIN] {stamp} | {status} | {took:>13} | {client:>15} | {method:<7} "{path}"')


# ------------------------------------------------------------------------------------ values and names


def go_time(epoch: float) -> str:
    """A time as Go's encoding/json writes it (RFC 3339, nanoseconds without trailing zeros; UTC in a container)."""
    seconds = math.floor(epoch)
    nanos = int(round((epoch - seconds) * 1e6)) * 1000  # a float holds microseconds, not nanoseconds
    if nanos >= 10**9:
        seconds, nanos = seconds + 1, nanos - 10**9
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{nanos:09d}".rstrip("0")
    return f"{stamp}.{fraction}Z" if fraction else f"{stamp}Z"


def compact(obj) -> str:
    """JSON as Go's encoding/json writes it: no spaces, UTF-8 kept."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class BadRequest(Exception):
    pass


def parse_go_duration(text: str) -> float:
    """Seconds of a Go duration string ("5m", "1h30m", "300ms", "0"), as time.ParseDuration takes it."""
    if text in ("0", "+0", "-0"):
        return 0.0
    if not GO_DURATION.match(text):
        if re.match(r"^[+-]?(\d+(\.\d*)?|\.\d+)$", text):
            raise BadRequest(f'time: missing unit in duration "{text}"')
        raise BadRequest(f'time: invalid duration "{text}"')
    sign = -1.0 if text.startswith("-") else 1.0
    pieces = re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)", text.lstrip("+-"))
    return sign * sum(float(number) * GO_UNITS[unit] for number, unit in pieces)


def keep_alive_from_request(value) -> object:
    """A request's ``keep_alive`` (api.Duration): a number is seconds, a string a Go duration; negative = forever.

    Returns UNSET when absent, None for forever, else seconds (0 = unload).
    """
    if value is None:
        return UNSET
    if isinstance(value, bool):
        raise BadRequest("Unsupported type: 'bool'")
    if isinstance(value, (int, float)):
        return None if value < 0 else float(int(value))
    if isinstance(value, str):
        seconds = parse_go_duration(value)
        return None if seconds < 0 else seconds
    raise BadRequest(f"Unsupported type: '{type(value).__name__}'")


def keep_alive_from_env(text: str) -> float | None:
    """OLLAMA_KEEP_ALIVE: a Go duration or whole seconds; negative = forever (None)."""
    text = text.strip()
    try:
        seconds = parse_go_duration(text)
    except BadRequest:
        try:
            seconds = float(int(text))
        except ValueError:
            log("WARN", "invalid OLLAMA_KEEP_ALIVE, using the default 5m", value=text)
            seconds = 300.0
    return None if seconds < 0 else seconds


def parse_name(name) -> tuple[str, str, str, str] | None:
    """(host, namespace, model, tag) of an Ollama model name, as types/model/name.go ``ParseName``.

    The host defaults to ``registry.ollama.ai``, the namespace to ``library``, the tag to ``latest``.
    Case is kept here; matching is case-insensitive (:meth:`Store.existing_name`).
    """
    if not isinstance(name, str):
        return None
    name = name.strip()
    if not name or any(ch.isspace() for ch in name):
        return None
    base, tag = name, "latest"
    if ":" in name.rsplit("/", 1)[-1]:
        base, tag = name.rsplit(":", 1)
    parts = base.split("/")
    if len(parts) == 1:
        host, namespace, model = DEFAULT_HOST, DEFAULT_NAMESPACE, parts[0]
    elif len(parts) == 2:
        host, (namespace, model) = DEFAULT_HOST, parts
    elif len(parts) == 3:
        host, namespace, model = parts
    else:
        return None
    if not all(NAME_PART.match(part) for part in (host, namespace, model, tag)):
        return None
    return host, namespace, model, tag


def display_name(parts: tuple[str, str, str, str]) -> str:
    """The shortest form, as /api/tags shows it: ``llama3.2:1b``, ``user/model:tag``, ``host/ns/model:tag``.

    Mirrors types/model/name.go ``Name.DisplayShortest``: the default host and namespace are
    recognised whatever their case.
    """
    host, namespace, model, tag = parts
    if host.lower() != DEFAULT_HOST:
        return f"{host}/{namespace}/{model}:{tag}"
    if namespace.lower() != DEFAULT_NAMESPACE:
        return f"{namespace}/{model}:{tag}"
    return f"{model}:{tag}"


def normal_name(name) -> str | None:
    parts = parse_name(name)
    return display_name(parts) if parts else None


def parameter_count_of(size_text: str) -> int | None:
    match = re.match(r"^\s*([\d.]+)\s*([KMBT])\s*$", str(size_text).upper())
    if not match:
        return None
    return int(float(match.group(1)) * {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[match.group(2)])


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        log("WARN", f"invalid {name}, using the default", value=raw, default=default)
        return default


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        log("WARN", f"invalid {name}, using the default", value=raw, default=default)
        return default


def env_bool(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def parse_listen(value: str) -> tuple[str, int]:
    """OLLAMA_HOST: ``host:port``, ``host``, ``:port`` or with an http(s):// scheme."""
    value = value.strip() or f"127.0.0.1:{DEFAULT_PORT}"
    for scheme in ("http://", "https://"):
        if value.startswith(scheme):
            value = value[len(scheme) :]
    value = value.rstrip("/")
    if value.startswith("["):  # [::1]:port
        host, _, rest = value[1:].partition("]")
        port = rest.lstrip(":")
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, ""
    return host or "127.0.0.1", int(port) if port else DEFAULT_PORT


# ------------------------------------------------------------------------------------------ the registry


def registry_entry(name: str, raw: dict) -> dict:
    """A registry model with defaults filled; its layers (weights, template, config) sum to ``size``.

    ``capabilities`` are what server/images.go ``Model.Capabilities`` finds: "embedding" for a GGUF
    with a pooling type, else "completion". ``num_ctx`` is a Modelfile parameter (``m.Options``).
    """
    family = raw.get("family", "llama")
    size = int(raw.get("size", 500_000_000))
    parameter_size = raw.get("parameter_size")
    parameter_count = raw.get("parameter_count") or (parameter_count_of(parameter_size) if parameter_size else None)
    parameter_count = int(parameter_count or 1_000_000_000)
    if not parameter_size:
        parameter_size = f"{parameter_count / 1e9:.1f}B" if parameter_count >= 1e9 else f"{parameter_count / 1e6:.2f}M"
    capabilities = raw.get("capabilities") or ["completion"]
    if not isinstance(capabilities, list) or not all(isinstance(c, str) for c in capabilities):
        raise ValueError(f"STANDIN_REGISTRY: {name}: capabilities must be a list of strings")

    def count(key: str, default):
        value = raw.get(key, default)
        return [int(v) for v in value] if isinstance(value, list) else int(value)

    head_count = count("head_count", 32)
    entry = {
        "name": name,
        "size": size,
        "details": {
            "parent_model": "",
            "format": raw.get("format", "gguf"),
            "family": family,
            "families": [family],
            "parameter_size": parameter_size,
            "quantization_level": raw.get("quantization_level", "Q4_0"),
        },
        "architecture": raw.get("architecture", family),
        "parameter_count": parameter_count,
        "block_count": int(raw.get("block_count", 16)),
        "embedding_length": int(raw.get("embedding_length", 2048)),
        "head_count": head_count,
        "head_count_kv": count("head_count_kv", raw.get("head_count", 8)),
        "key_length": int(raw["key_length"]) if raw.get("key_length") else None,
        "value_length": int(raw["value_length"]) if raw.get("value_length") else None,
        "context_length": int(raw.get("context_length", 4096)),
        "capabilities": capabilities,
        "parameters": {"num_ctx": int(raw["num_ctx"])} if raw.get("num_ctx") else {},
        "load_error": raw.get("load_error"),
    }
    template_size, config_size = len(TEMPLATE.encode()), 487
    weights = max(size - template_size - config_size, 1)

    def digest(kind: str) -> str:
        return "sha256:" + hashlib.sha256(f"standin|{name}|{kind}|{size}".encode()).hexdigest()

    entry["layers"] = [
        {"mediaType": "application/vnd.ollama.image.model", "digest": digest("model"), "size": weights},
        {"mediaType": "application/vnd.ollama.image.template", "digest": digest("template"), "size": template_size},
    ]
    entry["config"] = {
        "mediaType": "application/vnd.docker.container.image.v1+json",
        "digest": digest("config"),
        "size": size - weights - template_size,
    }
    return entry


def load_registry() -> dict[str, dict]:
    """The models pulls can fetch, keyed by lower-cased name (the stand-in's registry matches any case)."""
    raw = os.environ.get("STANDIN_REGISTRY", "").strip()
    offered = json.loads(raw) if raw else DEFAULT_REGISTRY
    if not isinstance(offered, dict):
        raise ValueError("STANDIN_REGISTRY must be a JSON object of model name to properties")
    registry = {}
    for name, properties in offered.items():
        normal = normal_name(name)
        if normal is None:
            raise ValueError(f"STANDIN_REGISTRY: invalid model name {name!r}")
        registry[normal.lower()] = registry_entry(normal, properties or {})
    return registry


# ------------------------------------------------------------------------------------------ the store


class Store:
    """Manifests under ``<root>/manifests/<host>/<namespace>/<model>/<tag>``, Ollama's layout (no blobs)."""

    def __init__(self, root: Path):
        self.root = root
        self.manifests = root / "manifests"

    def prepare(self) -> None:
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.manifests.mkdir(parents=True, exist_ok=True)

    def _all_parts(self) -> list[tuple[str, str, str, str]]:
        found = []
        for path in self.manifests.glob("*/*/*/*"):
            if not path.name.startswith(".") and path.is_file():
                host, namespace, model, tag = path.relative_to(self.manifests).parts
                found.append((host, namespace, model, tag))
        return found

    def existing_name(self, name) -> tuple[str, str, str, str] | None:
        """The parts of ``name`` with each one replaced by an existing manifest's part that equals it but for case.

        Mirrors server/routes.go ``getExistingName``, part by part as it does, so "Tiny-A:1B",
        "library/tiny-a:1b" and "registry.ollama.ai/library/tiny-a:1b" all name a stored "tiny-a:1b".
        """
        parts = parse_name(name)
        if parts is None:
            return None
        host, namespace, model, tag = parts
        for e_host, e_namespace, e_model, e_tag in self._all_parts():
            host = e_host if e_host.lower() == host.lower() else host
            namespace = e_namespace if e_namespace.lower() == namespace.lower() else namespace
            model = e_model if e_model.lower() == model.lower() else model
            tag = e_tag if e_tag.lower() == tag.lower() else tag
        return host, namespace, model, tag

    def path(self, parts: tuple[str, str, str, str]) -> Path:
        return self.manifests.joinpath(*parts)

    def write(self, entry: dict, parts: tuple[str, str, str, str]) -> None:
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": entry["config"],
            "layers": entry["layers"],
            "standin": {key: value for key, value in entry.items() if key not in ("layers", "config")},
        }
        path = self.path(parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        temporary.write_text(json.dumps(manifest, separators=(",", ":")))
        os.replace(temporary, path)

    def _read(self, path: Path, name: str) -> dict | None:
        try:
            raw = path.read_bytes()
            manifest = json.loads(raw)
            modified = path.stat().st_mtime
        except (OSError, ValueError):
            return None
        model = dict(manifest.get("standin") or {})
        model.setdefault("capabilities", ["completion"])
        model.setdefault("parameters", {})
        model["name"] = name
        model["digest"] = hashlib.sha256(raw).hexdigest()
        model["size"] = sum(int(layer.get("size", 0)) for layer in manifest.get("layers", [])) + int(
            (manifest.get("config") or {}).get("size", 0)
        )
        model["modified_at"] = modified
        model["blob"] = (manifest.get("layers") or [{}])[0].get("digest", "")
        return model

    def get(self, name) -> dict | None:
        parts = self.existing_name(name)
        if parts is None:
            return None
        path = self.path(parts)
        return self._read(path, display_name(parts)) if path.is_file() else None

    def delete(self, name) -> bool:
        parts = self.existing_name(name)
        if parts is None or not self.path(parts).is_file():
            return False
        self.path(parts).unlink()
        return True

    def list(self) -> list[dict]:
        models = [found for parts in self._all_parts() if (found := self._read(self.path(parts), display_name(parts)))]
        models.sort(key=lambda m: m["modified_at"], reverse=True)  # newest first, as Ollama lists
        return models


# ------------------------------------------------------------------------------------------ the scheduler


class LoadFailed(Exception):
    pass


class ServerBusy(Exception):
    """More requests wait for a load than OLLAMA_MAX_QUEUE (server/sched.go ``ErrMaxQueue``)."""


class ClientGone(Exception):
    pass


class RunnerDied(Exception):
    """The runner stopped in the middle of an answer (STANDIN_STREAM_FAIL_AFTER)."""


class Runner:
    """A loaded model: what real Ollama runs as a llama-server subprocess (server/sched.go ``runnerRef``).

    ``state`` is "loading", "ready" or "stopping" (unloading, still listed: STANDIN_UNLOAD_SECONDS).
    """

    def __init__(self, model: dict, num_ctx: int, parallel: int, session: float | None, kv_bytes: float):
        self.name = model["name"]
        self.model = model
        self.num_ctx = num_ctx  # per slot, after the cap at the training context
        self.parallel = parallel
        self.session = session  # keep-alive seconds; None = forever; 0 = unload when idle
        self.refcount = 0
        self.expires_at: float | None = None  # wall clock, set when it goes idle with a finite keep-alive
        self.state = "loading"
        self.stop_at: float | None = None  # monotonic: when a stopping runner is gone
        self.stop_reason = ""
        self.exited = False  # the runner process died (a failed stream): the next request reloads it
        self.error: str | None = None
        self.last_used = time.monotonic()
        self.slots = threading.Semaphore(parallel)
        self.size = memory_size(model, num_ctx * parallel, kv_bytes)
        self.vram = 0


def kv_heads_per_layer(model: dict) -> list[int]:
    layers = model.get("block_count") or 0
    kv = model.get("head_count_kv")
    if isinstance(kv, list):
        return (kv + kv[-1:] * layers)[:layers] if kv else [0] * layers
    heads = model.get("head_count")
    default = max(heads) if isinstance(heads, list) and heads else (heads or 1)
    return [kv or default] * layers


def memory_size(model: dict, context: int, kv_bytes: float) -> int:
    """The model's size plus its KV cache for ``context`` tokens, as llama.cpp allocates it.

    K and V per layer: ``head_count_kv * key_length`` and ``head_count_kv * value_length``; both
    lengths default to ``embedding_length / head_count`` (fs/ggml/ggml.go ``EmbeddingHeadCountK``).
    """
    heads = model.get("head_count") or 1
    if (
        isinstance(heads, list)
        or isinstance(model.get("head_count_kv"), list)
        or model.get("key_length")
        or model.get("value_length")
    ):
        head_max = max(heads) if isinstance(heads, list) and heads else (heads if not isinstance(heads, list) else 1)
        width = model.get("embedding_length") or 0
        key = model.get("key_length") or width // max(head_max, 1)
        value = model.get("value_length") or width // max(head_max, 1)
        kv = sum(kv_heads_per_layer(model)) * (key + value) * context * kv_bytes
        return int(model["size"] + kv)
    kv_width = (model.get("embedding_length") or 0) * (model.get("head_count_kv") or heads) / heads
    kv = 2 * (model.get("block_count") or 0) * kv_width * context * kv_bytes
    return int(model["size"] + kv)


WAIT = object()  # _room_for: nothing to evict now, wait for a runner that is loading or stopping


class Scheduler:
    """Loads, reloads, evicts and unloads runners as server/sched.go ``Scheduler`` does."""

    def __init__(self, settings: dict):
        self.settings = settings
        self.cond = threading.Condition()
        self.loaded: dict[str, Runner] = {}
        self.loading: set[Runner] = set()
        self.waiting: deque = deque()  # tickets of requests waiting to be scheduled (sched.go pendingReqCh)
        self.turn: object | None = None  # the ticket being scheduled (sched.go processPending's current request)
        self.used_elsewhere = settings["vram_used_elsewhere"]
        self.stats = dict.fromkeys(
            ("loads", "reloads", "unloads", "evictions", "aborted_loads", "failed_loads", "busy_rejections", "pulls"), 0
        )

    # -- helpers

    def effective_ctx(self, model: dict, num_ctx: int) -> int:
        """``num_ctx`` capped at the training context (sched.go ``effectiveContext``, llm/server.go
        ``NewLlamaServer``), at least 4 (sched.go ``getRunner``)."""
        num_ctx = max(int(num_ctx), 4)
        train = model.get("context_length") or 0
        if self.settings["cap_context"] and 0 < train < num_ctx:
            return train
        return num_ctx

    def parallel_of(self, model: dict) -> int:
        """OLLAMA_NUM_PARALLEL, but 1 for a model without "completion" (sched.go ``load``)."""
        return self.settings["parallel"] if "completion" in model.get("capabilities", ["completion"]) else 1

    def _free_vram(self, but: Runner | None = None) -> int:
        """Free GPU memory as sched.go ``updateFreeSpace`` sees it: the total less other processes' use
        and the loaded runners' (predicted) use."""
        used = sum(r.vram for r in self.loaded.values() if r is not but)
        return self.settings["vram_bytes"] - self.used_elsewhere - used

    def _max_loaded(self) -> int:
        return self.settings["max_loaded"] or DEFAULT_MODELS_PER_GPU

    def _victim(self) -> Runner | object:
        """sched.go ``findRunnerToUnload``: by keep-alive (shortest first; forever last), then model path;
        an idle runner first, else the first one (it goes once its requests end)."""
        candidates = [r for r in self.loaded.values() if r.state == "ready"]
        if not candidates:
            return WAIT
        candidates.sort(key=lambda r: (math.inf if r.session is None else r.session, r.model.get("blob", r.name)))
        return next((r for r in candidates if r.refcount == 0), candidates[0])

    def _room_for(self, size: int) -> Runner | object | None:
        """What must go before a model of ``size`` bytes loads: None (it fits), a runner to evict, or WAIT.

        Mirrors sched.go ``processPending`` (OLLAMA_MAX_LOADED_MODELS) and ``load`` (a load predicted
        to need more than 80% of the free VRAM, with other models loaded, evicts first).
        """
        stopping = any(r.state == "stopping" for r in self.loaded.values())
        if len(self.loaded) >= self._max_loaded():
            return WAIT if stopping else self._victim()
        if self.settings["vram_bytes"] and self.loaded and size > self._free_vram() * 80 // 100:
            return WAIT if stopping else self._victim()
        return None

    def _needs_reload(self, runner: Runner, num_ctx: int) -> bool:
        """sched.go ``needsReload``: the runner options differ, or the runner no longer answers a ping."""
        return runner.num_ctx != num_ctx or runner.exited

    # -- the request side

    def acquire(self, model: dict, requested_ctx: int, keep_alive, gone=lambda: False) -> Runner:
        """The ready runner of ``model`` for a request (its refcount taken), loading it as Ollama does.

        A runner that is loaded and needs no reload is used at once (sched.go ``getRunner``); else the
        request queues (at most OLLAMA_MAX_QUEUE, then :class:`ServerBusy`), and, one at a time, makes
        room (reload, eviction by count or by VRAM) and loads (sched.go ``processPending``, ``load``).
        A request whose client left while it waited is dropped (:class:`ClientGone`).
        """
        settings, name = self.settings, model["name"]
        num_ctx = self.effective_ctx(model, requested_ctx)
        ticket = None
        with self.cond:
            try:
                while True:
                    self._expire_due()
                    runner = self.loaded.get(name)
                    usable = (
                        runner is not None and runner.state != "stopping" and not self._needs_reload(runner, num_ctx)
                    )
                    if usable and runner.state == "ready":
                        self._use(runner, keep_alive)
                        return runner
                    if not usable:  # (a usable runner that is loading: wait for it, as Ollama waits on its lock)
                        if ticket is None:
                            if len(self.waiting) >= settings["max_queue"]:
                                self.stats["busy_rejections"] += 1
                                log(
                                    "WARN",
                                    "server busy: too many requests wait for a load",
                                    model=name,
                                    OLLAMA_MAX_QUEUE=settings["max_queue"],
                                )
                                raise ServerBusy(SERVER_BUSY)
                            ticket = object()
                            self.waiting.append(ticket)
                        if self.turn is not ticket:
                            if (
                                self.waiting[0] is ticket
                                and self.turn is None
                                and not (settings["serial_loads"] and self.loading)
                            ):
                                self.waiting.popleft()
                                self.turn = ticket
                                continue
                        else:
                            created = self._schedule(model, runner, num_ctx)
                            if created is not None:
                                runner = created
                                break
                    if gone():
                        log("INFO", "pending request cancelled, skipping scheduling", model=name)
                        raise ClientGone()
                    self.cond.wait(0.05)
            finally:
                self._drop(ticket)
        return self._load(runner, keep_alive, gone)

    def _drop(self, ticket) -> None:
        if ticket is None:
            return
        if self.turn is ticket:
            self.turn = None
        with contextlib.suppress(ValueError):
            self.waiting.remove(ticket)
        self.cond.notify_all()

    def _use(self, runner: Runner, keep_alive) -> None:
        """sched.go ``useLoadedRunner``: one more request, the expiry timer stopped, the keep-alive updated."""
        runner.refcount += 1
        runner.expires_at = None
        runner.last_used = time.monotonic()
        if keep_alive is not UNSET:
            runner.session = keep_alive

    def _schedule(self, model: dict, runner: Runner | None, num_ctx: int) -> Runner | None:
        """With the turn: expire what must go (and return None to wait), or create the runner to load."""
        settings, name = self.settings, model["name"]
        if runner is not None:  # loaded with other options, dead, loading other options, or stopping
            if runner.state == "ready" and runner.session != 0:
                self.stats["reloads"] += 1
                why = "runner exited" if runner.exited else "runner options changed"
                log("INFO", f"reloading: {why}", model=name, num_ctx_loaded=runner.num_ctx, num_ctx_requested=num_ctx)
                self._expire(runner, f"reloading: {why}")
            return None
        parallel = self.parallel_of(model)
        candidate = Runner(model, num_ctx, parallel, None, settings["kv_bytes"])
        room = self._room_for(candidate.size)
        if room is WAIT:
            return None
        if isinstance(room, Runner):
            if room.session != 0:
                self.stats["evictions"] += 1
                if len(self.loaded) >= self._max_loaded():
                    why = "max loaded models reached, unloading one to make room"
                else:
                    why = "model predicted to exceed 80% of the free VRAM, evicting to make room"
                log(
                    "INFO",
                    "evicting a model to make room",
                    model=room.name,
                    for_model=name,
                    reason=why,
                    loaded=len(self.loaded),
                    OLLAMA_MAX_LOADED_MODELS=self._max_loaded(),
                    free_vram=self._free_vram() if settings["vram_bytes"] else None,
                    needed=candidate.size,
                )
                self._expire(room, why)
            return None
        if settings["vram_bytes"]:  # all of it on the GPU, or as much as fits (llama-server's own fit)
            candidate.vram = max(0, min(candidate.size, self._free_vram()))
        elif settings["gpu"]:
            candidate.vram = candidate.size
        self.loaded[name] = candidate
        self.loading.add(candidate)
        self.turn = None
        self.cond.notify_all()
        return candidate

    def _load(self, runner: Runner, keep_alive, gone) -> Runner:
        """Load outside the lock: STANDIN_LOAD_SECONDS, aborted when the client leaves (llm/llama_server.go
        ``WaitUntilRunning`` returns on ``ctx.Done()``), failing past OLLAMA_LOAD_TIMEOUT."""
        settings, name = self.settings, runner.name
        runner.session = settings["keep_alive"] if keep_alive is UNSET else keep_alive
        log(
            "INFO",
            "loading model",
            model=name,
            num_ctx=runner.num_ctx * runner.parallel,
            parallel=runner.parallel,
            size=runner.size,
            size_vram=runner.vram,
            keep_alive="forever" if runner.session is None else f"{runner.session:g}s",
        )
        started = time.monotonic()
        error = None
        timeout = settings["load_timeout"]
        while True:
            elapsed = time.monotonic() - started
            if settings["abort_on_disconnect"] and gone():
                error = "client connection closed before llama-server finished loading, aborting load"
                break
            if elapsed >= settings["load_seconds"]:
                break
            if timeout is not None and elapsed >= timeout:
                error = LOAD_TIMED_OUT
                break
            time.sleep(
                min(0.02, settings["load_seconds"] - elapsed, math.inf if timeout is None else timeout - elapsed)
            )
        error = error or (str(runner.model["load_error"]) if runner.model.get("load_error") else None)
        with self.cond:
            self.loading.discard(runner)
            if error:
                runner.error = error
                self._remove(runner, "load failed", error=error)
                self.stats["aborted_loads" if error.startswith("client") else "failed_loads"] += 1
            else:
                runner.state = "ready"
                self.stats["loads"] += 1
                self._use(runner, UNSET)
            self.cond.notify_all()
        if error and error.startswith("client"):
            log("WARN", error, model=name)
            raise ClientGone()
        if error:
            log("ERROR", "error loading model", model=name, error=error)
            raise LoadFailed(error)
        log("INFO", "loaded model", model=name, size=runner.size, size_vram=runner.vram)
        return runner

    def release(self, runner: Runner) -> None:
        """A request ended (sched.go ``processCompleted``): an idle runner expires now (keep-alive 0) or later."""
        with self.cond:
            runner.refcount -= 1
            runner.last_used = time.monotonic()
            if runner.refcount <= 0 and self.loaded.get(runner.name) is runner and runner.state == "ready":
                if runner.session == 0:
                    self._stop(runner, runner.stop_reason or "keep_alive 0: unloading when idle")
                elif runner.session is not None:
                    runner.expires_at = time.time() + runner.session
            self.cond.notify_all()

    def crash(self, runner: Runner) -> None:
        """The runner died mid-answer: it stays listed, and the next request reloads it (sched.go ``needsReload``'s ping)."""
        with self.cond:
            runner.exited = True
        log("ERROR", "llama runner terminated", model=runner.name, error=RUNNER_DIED)

    def expire(self, name: str) -> None:
        """keep_alive 0 with nothing to generate (sched.go ``expireRunner``): unload when idle."""
        with self.cond:
            runner = self.loaded.get(name)
            if runner is not None:
                self._expire(runner, "unload requested (keep_alive 0)")

    def _expire(self, runner: Runner, why: str) -> None:
        runner.session = 0
        runner.expires_at = time.time()
        runner.stop_reason = why
        if runner.refcount <= 0 and runner.state == "ready":
            self._stop(runner, why)
        self.cond.notify_all()

    def _stop(self, runner: Runner, why: str) -> None:
        """Unload: now (STANDIN_UNLOAD_SECONDS=off, the old stand-in), or after the delay, listed meanwhile."""
        delay = self.settings["unload_seconds"]
        if delay is None:
            self._remove(runner, why)
            return
        if runner.state != "stopping":
            runner.state = "stopping"
            runner.stop_at = time.monotonic() + delay
            log("INFO", "stopping runner", model=runner.name, reason=why, after=f"{delay:g}s")

    def tick(self) -> None:
        with self.cond:
            self._expire_due()

    def _expire_due(self) -> None:
        now, clock = time.time(), time.monotonic()
        for runner in list(self.loaded.values()):
            if runner.state == "stopping" and runner.stop_at is not None and clock >= runner.stop_at:
                self._remove(runner, runner.stop_reason or "stopped")
            elif (
                runner.state == "ready"
                and runner.refcount <= 0
                and runner.expires_at is not None
                and runner.session != 0
                and now >= runner.expires_at
            ):
                runner.session = 0
                runner.stop_reason = "keep_alive expired"
                self._stop(runner, "keep_alive expired")

    def _remove(self, runner: Runner, why: str, **fields) -> None:
        if self.loaded.get(runner.name) is runner:
            del self.loaded[runner.name]
            if runner.state != "loading":
                self.stats["unloads"] += 1
            log("INFO", "unloaded model", model=runner.name, reason=why, **fields)
        self.cond.notify_all()

    # -- what the API shows

    def running(self) -> list[dict]:
        """/api/ps (server/routes.go ``PsHandler``, sched.go ``loadedModels``): it waits while a load runs,
        as ``loadedModels`` waits for each runner's lock, which a loading runner holds."""
        with self.cond:
            while self.settings["ps_waits"] and self.loading:
                self.cond.wait(0.05)
            self._expire_due()
            now = time.time()
            entries = []
            for runner in self.loaded.values():
                if runner.session is None:
                    expires = now + FOREVER_NS / 1e9
                elif runner.expires_at is not None:
                    expires = runner.expires_at
                else:
                    expires = now + runner.session
                model = runner.model
                entries.append(
                    (
                        expires,
                        {
                            "name": runner.name,
                            "model": runner.name,
                            "size": runner.size,
                            "digest": model["digest"],
                            "details": model.get("details", {}),
                            "expires_at": go_time(expires),
                            "size_vram": runner.vram,
                            "context_length": runner.num_ctx,
                        },
                    )
                )
        entries.sort(key=lambda pair: int(pair[0]), reverse=True)  # longest remaining first, by whole seconds
        return [entry for _, entry in entries]

    def snapshot(self) -> dict:
        """The stand-in's own counters and runners (GET /standin/stats; Ollama has no such thing)."""
        with self.cond:
            self._expire_due()
            vram = None
            if self.settings["vram_bytes"]:
                vram = {
                    "total": self.settings["vram_bytes"],
                    "used_elsewhere": self.used_elsewhere,
                    "free": self._free_vram(),
                }
            return {
                **self.stats,
                "queued": len(self.waiting),
                "loading": sorted(r.name for r in self.loading),
                "vram": vram,
                "runners": [
                    {
                        "name": r.name,
                        "state": r.state,
                        "num_ctx": r.num_ctx,
                        "parallel": r.parallel,
                        "size": r.size,
                        "size_vram": r.vram,
                        "refcount": r.refcount,
                        "exited": r.exited,
                    }
                    for r in self.loaded.values()
                ],
            }

    def set_used_elsewhere(self, value: int) -> None:
        with self.cond:
            self.used_elsewhere = value
            self.cond.notify_all()


# ------------------------------------------------------------------------------------------ generation


def plan_tokens(limit) -> tuple[list[str], str]:
    """The canned answer, cut at ``limit`` tokens (num_predict / max_tokens; negative or absent = no limit)."""
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit < 0 or limit > len(CANNED):
        return list(CANNED), "stop"
    return CANNED[: int(limit)], "length"


def count_words(text: str) -> int:
    return max(1, len(text.split()))


def message_text(messages) -> str:
    parts = []
    for message in messages or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict))
    return " ".join(parts)


def embedding_of(text: str, dimensions: int) -> list[float]:
    """A unit vector made from the text's hash: the same text, the same embedding (server/routes.go
    ``EmbedHandler`` normalizes what the runner returns)."""
    values, counter = [], 0
    while len(values) < dimensions:
        block = hashlib.sha256(f"{counter}|{text}".encode()).digest()
        values.extend((b - 127.5) / 127.5 for b in block)
        counter += 1
    values = values[:dimensions]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [float(struct.unpack("<f", struct.pack("<f", v / norm))[0]) for v in values]  # float32, as Ollama's


def normalize(values: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def show_info(model: dict, verbose: bool) -> dict:
    """/api/show's ``model_info``: the GGUF key-values (server/routes.go ``GetModelInfo``/``getModelData``).

    Without ``verbose`` Ollama reads the GGUF with ``maxArraySize`` 0 (fs/ggml/gguf.go ``newArray``),
    so every non-empty array comes out as ``null``; ``verbose`` gives the arrays whole.
    """
    arch = model.get("architecture", "llama")

    def value(v):
        return v if not isinstance(v, list) or verbose or not v else None

    info = {
        "general.architecture": arch,
        "general.parameter_count": model.get("parameter_count"),
        "general.quantization_version": 2,
        f"{arch}.block_count": model.get("block_count"),
        f"{arch}.context_length": model.get("context_length"),
        f"{arch}.embedding_length": model.get("embedding_length"),
        f"{arch}.attention.head_count": value(model.get("head_count")),
        f"{arch}.attention.head_count_kv": value(model.get("head_count_kv")),
    }
    for key in ("key_length", "value_length"):
        if model.get(key):
            info[f"{arch}.attention.{key}"] = model[key]
    if "completion" not in model.get("capabilities", ["completion"]):
        info[f"{arch}.pooling_type"] = 1  # mean: what makes Ollama see an embedding model
    return info


def parameters_text(parameters: dict) -> str:
    """/api/show's ``parameters``: ``fmt.Sprintf("%-*s %#v", 30, k, v)`` per Modelfile option, joined by newlines."""
    return "\n".join(
        f"{key:<30} {json.dumps(value) if isinstance(value, str) else value}" for key, value in parameters.items()
    )


# ------------------------------------------------------------------------------------------ HTTP


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: StandinServer

    # -- plumbing

    def log_message(self, format, *args) -> None:  # noqa: A002 - our own request log replaces http.server's
        pass

    def send_response(self, code, message=None) -> None:  # no Server header: Go's net/http sends none
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())
        self.status = code

    def handle_one_request(self) -> None:
        self.status = 0
        self.started = time.monotonic()
        super().handle_one_request()

    def _dispatch(self) -> None:
        path = unquote(urlsplit(self.path).path)
        routes = {
            ("GET", "/"): self.root,
            ("HEAD", "/"): self.root,
            ("GET", "/api/version"): self.version,
            ("HEAD", "/api/version"): self.version,
            ("GET", "/api/tags"): self.tags,
            ("HEAD", "/api/tags"): self.tags,
            ("GET", "/api/ps"): self.ps,
            ("POST", "/api/pull"): self.pull,
            ("POST", "/api/generate"): self.generate,
            ("POST", "/api/chat"): self.chat,
            ("POST", "/api/embed"): self.embed,
            ("POST", "/api/show"): self.show,
            ("DELETE", "/api/delete"): self.delete,
            ("GET", "/v1/models"): self.openai_models,
            ("POST", "/v1/chat/completions"): self.openai_chat,
            ("POST", "/v1/embeddings"): self.openai_embeddings,
            ("GET", "/standin/stats"): self.standin_stats,
            ("POST", "/standin/vram"): self.standin_vram,
        }
        route = routes.get((self.command, path))
        if route is None and self.command == "GET" and path.startswith("/v1/models/"):
            route = lambda: self.openai_model(path[len("/v1/models/") :])  # noqa: E731
        try:
            self.body_bytes = self._read_body()
            if route is None:
                self.send_text(404, "404 page not found")  # gin's answer to an unknown route
            else:
                route()
        except ClientGone:
            self.close_connection = True
            self.status = self.status or 499
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            self.status = self.status or 499
        except Exception as exc:  # a bug of the stand-in: say so in the log and to the client, keep serving
            log(
                "ERROR",
                "stand-in bug while handling a request",
                error=repr(exc),
                traceback=json.dumps(traceback.format_exc()),
            )
            self.close_connection = True
            if not self.status:
                with contextlib.suppress(OSError):
                    self.send_error_json(500, f"stand-in internal error: {exc!r}")
        finally:
            client = self.client_address[0] if self.client_address else "-"
            log_request(self.status, time.monotonic() - self.started, client, self.command, path)

    do_GET = do_POST = do_HEAD = do_DELETE = do_PUT = _dispatch

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def json_body(self) -> dict:
        """The request's JSON object; BadRequest as Ollama words it for a missing or broken body."""
        if not self.body_bytes.strip():
            raise BadRequest("missing request body")
        try:
            body = json.loads(self.body_bytes)
        except ValueError as exc:
            raise BadRequest(f"invalid character in request body: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("json: cannot unmarshal into Go value of type api.Request")
        return body

    def client_gone(self) -> bool:
        """Whether the client closed its connection (the request's context is done, in Go's terms)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def send_bytes(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_json(self, status: int, obj) -> None:
        data = compact(obj).encode()
        self.send_bytes(status, data, "application/json; charset=utf-8")

    def send_text(self, status: int, text: str) -> None:
        self.send_bytes(status, text.encode(), "text/plain; charset=utf-8")

    def start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        if content_type == "text/event-stream":
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "keep-alive")
        self.end_headers()

    def write_chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ClientGone() from exc

    def write_ndjson(self, obj) -> None:
        self.write_chunk(compact(obj).encode() + b"\n")

    def write_sse(self, payload: str) -> None:
        self.write_chunk(f"data: {payload}\n\n".encode())

    def end_stream(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ClientGone() from exc

    def body_or_error(self, openai: bool = False) -> dict | None:
        try:
            return self.json_body()
        except BadRequest as exc:
            self.send_error_json(400, str(exc), openai)
            return None

    def send_error_json(self, status: int, message: str, openai: bool = False) -> None:
        """``{"error": message}``, or on ``/v1`` openai/openai.go ``NewError``: the type follows the status."""
        if openai:
            kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
            self.send_json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})
        else:
            self.send_json(status, {"error": message})

    # -- shared pieces

    @property
    def st(self) -> StandinServer:
        return self.server

    def model_or_404(self, name, openai: bool = False, pull_hint: bool = False) -> dict | None:
        """The stored model, or 404 as server/routes.go words it: ``model 'x' not found`` from
        Generate/Chat/Show, ``model "x" not found, try pulling it first`` from ``handleScheduleError``."""
        model = self.st.store.get(name)
        if model is None:
            message = (
                f"model {json.dumps(name)} not found, try pulling it first"
                if pull_hint
                else f"model '{name}' not found"
            )
            self.send_error_json(404, message, openai)
        return model

    def num_ctx_of(self, model: dict, options) -> int:
        """The request's ``num_ctx``, else the Modelfile's, else OLLAMA_CONTEXT_LENGTH (server/routes.go
        ``modelOptions``: defaults, then ``model.Options``, then the request's options)."""
        value = (options or {}).get("num_ctx") if isinstance(options, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return int(value)
        own = (model.get("parameters") or {}).get("num_ctx")
        return int(own) if own else self.st.settings["context_length"]

    def load(self, model: dict, num_ctx: int, keep_alive, openai: bool = False) -> Runner | None:
        """The runner, or the error answered as server/routes.go ``handleScheduleError`` does."""
        try:
            return self.st.scheduler.acquire(model, num_ctx, keep_alive, self.client_gone)
        except ServerBusy as exc:
            self.send_error_json(503, str(exc), openai)
        except LoadFailed as exc:
            self.send_error_json(500, str(exc), openai)
        return None

    def produce(self, runner: Runner, limit, on_token) -> tuple[list[str], str, int]:
        """Canned tokens; with STANDIN_STREAM_FAIL_AFTER the runner dies after that many (:class:`RunnerDied`)."""
        tokens, reason = plan_tokens(limit)
        fail_after = self.st.settings["stream_fail_after"]
        started = time.monotonic_ns()
        with runner.slots:  # OLLAMA_NUM_PARALLEL requests at once per model; the rest wait
            for index, token in enumerate(tokens):
                time.sleep(self.st.settings["token_seconds"])
                if fail_after is not None and index >= fail_after:
                    self.st.scheduler.crash(runner)
                    raise RunnerDied(RUNNER_DIED)
                on_token(token)
        return tokens, reason, time.monotonic_ns() - started

    # -- routes

    def root(self) -> None:
        self.send_text(200, "Ollama is running")

    def version(self) -> None:
        self.send_json(200, {"version": VERSION})

    def tags(self) -> None:
        self.send_json(
            200,
            {
                "models": [
                    {
                        "name": m["name"],
                        "model": m["name"],
                        "modified_at": go_time(m["modified_at"]),
                        "size": m["size"],
                        "digest": m["digest"],
                        "details": m.get("details", {}),
                    }
                    for m in self.st.store.list()
                ]
            },
        )

    def ps(self) -> None:
        self.send_json(200, {"models": self.st.scheduler.running()})

    def standin_stats(self) -> None:
        self.send_json(200, self.st.scheduler.snapshot())

    def standin_vram(self) -> None:
        body = self.body_or_error()
        if body is None:
            return
        value = body.get("used_elsewhere")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.send_error_json(400, "used_elsewhere must be a number of bytes")
            return
        self.st.scheduler.set_used_elsewhere(value)
        log("INFO", "memory used by other processes changed", used_elsewhere=value)
        self.send_json(200, self.st.scheduler.snapshot()["vram"])

    def pull(self) -> None:
        """server/routes.go ``PullHandler`` and server/images.go ``PullModel``: progress per layer, then
        "verifying sha256 digest" (a silent phase while the blobs are hashed), "writing manifest", "success"."""
        body = self.body_or_error()
        if body is None:
            return
        parts = self.st.store.existing_name(body.get("model") or body.get("name"))
        if parts is None:
            self.send_error_json(400, "invalid model name")
            return
        name = display_name(parts)
        stream = body.get("stream") is not False
        entry = self.st.registry.get(name.lower())
        present = self.st.store.get(name) is not None
        pull_seconds = 0.0 if present else self.st.settings["pull_seconds"]
        log("INFO", "pulling model", model=name, offered=entry is not None, already_present=present)
        with self.st.scheduler.cond:
            self.st.scheduler.stats["pulls"] += 1
        emit = self.write_ndjson if stream else (lambda obj: None)
        if stream:
            self.start_stream("application/x-ndjson")
        emit({"status": "pulling manifest"})
        time.sleep(min(0.05, pull_seconds))
        if entry is None:
            error = "pull model manifest: file does not exist"
            log("ERROR", "pull failed", model=name, error=error)
            if stream:
                emit({"error": error})
                self.end_stream()
            else:
                self.send_error_json(500, error)
            return
        layers = [*entry["layers"], entry["config"]]
        for layer in layers:
            status = {"status": f"pulling {layer['digest'][7:19]}", "digest": layer["digest"], "total": layer["size"]}
            emit(status)  # "completed" is left out while 0 (omitempty), as Ollama sends it
            big = layer is entry["layers"][0]
            steps = 10 if big and pull_seconds > 0 else 1
            for step in range(1, steps + 1):
                if big:
                    time.sleep(pull_seconds / steps)
                emit({**status, "completed": layer["size"] * step // steps})
        emit({"status": "verifying sha256 digest"})
        if not present:  # blobs already there are not verified again (skipVerify)
            time.sleep(self.st.settings["pull_silent_seconds"])
        emit({"status": "writing manifest"})
        self.st.store.write({**entry, "name": name}, parts)
        log("INFO", "pulled model", model=name, size=entry["size"])
        if stream:
            emit({"status": "success"})
            self.end_stream()
        else:
            self.send_json(200, {"status": "success"})

    def show(self) -> None:
        """server/routes.go ``ShowHandler``/``GetModelInfo``: details, capabilities, Modelfile parameters,
        model_info (arrays ``null`` unless ``verbose``); empty fields left out (omitempty)."""
        body = self.body_or_error()
        if body is None:
            return
        name = body.get("model") or body.get("name")
        if not name:
            self.send_error_json(400, "model is required")
            return
        model = self.st.store.get(name) if normal_name(name) else None
        if model is None:
            parts = self.st.store.existing_name(name)
            self.send_error_json(404, f"model '{display_name(parts) if parts else name}' not found")
            return
        blob = self.st.store.root / "blobs" / model.get("blob", "").replace(":", "-")
        parameters = model.get("parameters") or {}
        modelfile = (
            f'# Modelfile generated by "ollama show"\n# To build a new Modelfile based on this, replace FROM with:'
            f'\n# FROM {model["name"]}\n\nFROM {blob}\nTEMPLATE """{TEMPLATE}"""\n'
            + "".join(f"PARAMETER {key} {value}\n" for key, value in parameters.items())
        )
        answer = {
            "modelfile": modelfile,
            "parameters": parameters_text(parameters),
            "template": TEMPLATE,
            "details": model.get("details", {}),
            "model_info": show_info(model, body.get("verbose") is True),
            "capabilities": model.get("capabilities", ["completion"]),
            "modified_at": go_time(model["modified_at"]),
        }
        self.send_json(200, {key: value for key, value in answer.items() if value != ""})

    def delete(self) -> None:
        """server/routes.go ``DeleteHandler``: the manifest goes; a loaded runner stays (nothing unloads it)."""
        body = self.body_or_error()
        if body is None:
            return
        name = body.get("model") or body.get("name")
        if not self.st.store.delete(name):
            self.send_error_json(404, f"model '{name}' not found")
            return
        log("INFO", "deleted model", model=normal_name(name))
        self.send_bytes(200, b"", "text/plain; charset=utf-8")

    def _native(self, chat: bool) -> None:
        """/api/generate and /api/chat (server/routes.go ``GenerateHandler``, ``ChatHandler``): unload, load or generate.

        The unload (nothing to generate, keep_alive 0) answers at once and comes before the capability
        check; a model without "completion" answers 400 ``"x" does not support generate`` (or chat).
        A runner that dies mid-stream ends the NDJSON stream with one ``{"error": ...}`` line
        (``streamResponse``); before anything was sent, the answer is a 500.
        """
        body = self.body_or_error()
        if body is None:
            return
        requested = body.get("model")
        if not requested:
            self.send_error_json(400, "model is required")
            return
        try:
            keep_alive = keep_alive_from_request(body.get("keep_alive"))
        except BadRequest as exc:
            self.send_error_json(400, str(exc))
            return
        model = self.model_or_404(requested)
        if model is None:
            return
        text = message_text(body.get("messages")) if chat else body.get("prompt") or ""
        empty = not body.get("messages") if chat else not text

        def reply(content: str, done: bool, **extra) -> dict:
            answer = {"model": requested, "created_at": go_time(time.time())}
            if chat:
                answer["message"] = {"role": "assistant", "content": content}
            else:
                answer["response"] = content
            answer["done"] = done
            answer.update(extra)
            return answer

        if empty and keep_alive == 0:
            self.st.scheduler.expire(model["name"])
            self.send_json(200, reply("", True, done_reason="unload"))
            return
        if "completion" not in model.get("capabilities", ["completion"]):
            self.send_error_json(400, f"{json.dumps(requested)} does not support {'chat' if chat else 'generate'}")
            return
        started = time.monotonic_ns()
        runner = self.load(model, self.num_ctx_of(model, body.get("options")), keep_alive)
        if runner is None:
            return
        try:
            loaded = time.monotonic_ns()
            if empty:
                self.send_json(200, reply("", True, done_reason="load"))
                return
            stream = body.get("stream") is not False
            options = body.get("options") if isinstance(body.get("options"), dict) else {}
            prompt_count = count_words(text)
            streaming = []

            def emit(token: str) -> None:
                if not streaming:
                    self.start_stream("application/x-ndjson")
                    streaming.append(True)
                self.write_ndjson(reply(token, False))

            try:
                tokens, reason, eval_ns = self.produce(
                    runner, options.get("num_predict"), emit if stream else (lambda token: None)
                )
            except RunnerDied as exc:
                if streaming:
                    self.write_ndjson({"error": str(exc)})
                    self.end_stream()
                else:
                    self.send_error_json(500, str(exc))
                return
            stats = {
                "done_reason": reason,
                "total_duration": time.monotonic_ns() - started,
                "load_duration": loaded - started,
                "prompt_eval_count": prompt_count,
                "prompt_eval_duration": 1_000_000,
                "eval_count": len(tokens),
                "eval_duration": eval_ns,
            }
            if not chat:
                stats["context"] = list(range(1, prompt_count + len(tokens) + 1))
            if stream:
                if not streaming:
                    self.start_stream("application/x-ndjson")
                self.write_ndjson(reply("", True, **stats))
                self.end_stream()
            else:
                self.send_json(200, reply("".join(tokens), True, **stats))
        finally:
            self.st.scheduler.release(runner)

    def generate(self) -> None:
        self._native(chat=False)

    def chat(self) -> None:
        self._native(chat=True)

    def _embed(self, body: dict, openai: bool) -> tuple[dict, list[list[float]], int] | None:
        """server/routes.go ``EmbedHandler``: loads the model (any capability) and embeds each input."""
        requested = body.get("model")
        raw = body.get("input")
        if isinstance(raw, str):
            inputs = [raw] if raw else []
        elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
            inputs = list(raw)
        elif raw is None:
            inputs = []
        else:
            self.send_error_json(400, "invalid input type", openai)
            return None
        try:
            keep_alive = keep_alive_from_request(body.get("keep_alive"))
        except BadRequest as exc:
            self.send_error_json(400, str(exc), openai)
            return None
        model = self.st.store.get(requested) if requested and normal_name(requested) else None
        if model is None:
            self.send_error_json(404, f"model {json.dumps(requested or '')} not found, try pulling it first", openai)
            return None
        runner = self.load(model, self.num_ctx_of(model, body.get("options")), keep_alive, openai)
        if runner is None:
            return None
        try:
            dimensions = model.get("embedding_length") or 768
            wanted = body.get("dimensions")
            vectors = []
            with runner.slots:
                for text in inputs:
                    time.sleep(self.st.settings["token_seconds"])
                    vector = embedding_of(text, dimensions)
                    if isinstance(wanted, int) and not isinstance(wanted, bool) and 0 < wanted < dimensions:
                        vector = normalize(vector[:wanted])
                    vectors.append(vector)
            return model, vectors, sum(count_words(text) for text in inputs)
        finally:
            self.st.scheduler.release(runner)

    def embed(self) -> None:
        started = time.monotonic_ns()
        body = self.body_or_error()
        if body is None:
            return
        done = self._embed(body, openai=False)
        if done is None:
            return
        _, vectors, tokens = done
        answer = {"model": body.get("model"), "embeddings": vectors}
        if vectors:
            answer.update(
                total_duration=time.monotonic_ns() - started, load_duration=1_000_000, prompt_eval_count=tokens
            )
        self.send_json(200, answer)

    def openai_embeddings(self) -> None:
        """middleware/openai.go ``EmbeddingsMiddleware`` + openai/openai.go ``ToEmbeddingList``."""
        body = self.body_or_error(openai=True)
        if body is None:
            return
        encoding = body.get("encoding_format") or ""
        if encoding and encoding.lower() not in ("float", "base64"):
            self.send_error_json(
                400,
                f"Invalid value for 'encoding_format' = {encoding}. Supported values: ['float', 'base64'].",
                openai=True,
            )
            return
        raw = body.get("input")
        if raw == "":
            raw = [""]
        if raw is None or raw == []:
            self.send_error_json(400, "invalid input", openai=True)
            return
        done = self._embed(
            {"model": body.get("model"), "input": raw, "dimensions": body.get("dimensions")}, openai=True
        )
        if done is None:
            return
        _, vectors, tokens = done

        def encoded(vector: list[float]):
            if encoding.lower() == "base64":
                return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            return vector

        self.send_json(
            200,
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "embedding": encoded(vector), "index": index}
                    for index, vector in enumerate(vectors)
                ],
                "model": body.get("model"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    def openai_models(self) -> None:
        self.send_json(
            200,
            {
                "object": "list",
                "data": [
                    {
                        "id": m["name"],
                        "object": "model",
                        "created": int(m["modified_at"]),
                        "owned_by": parse_name(m["name"])[1],
                    }
                    for m in self.st.store.list()
                ],
            },
        )

    def openai_model(self, name: str) -> None:
        model = self.st.store.get(name) if normal_name(name) else None
        if model is None:
            self.send_error_json(404, f"model '{name}' not found", openai=True)
            return
        self.send_json(
            200, {"id": name, "object": "model", "created": int(model["modified_at"]), "owned_by": parse_name(name)[1]}
        )  # openai/openai.go ToModel: the name as asked

    def openai_chat(self) -> None:
        """/v1/chat/completions (middleware/openai.go ``ChatMiddleware``/``ChatWriter``, openai/openai.go).

        Stream: ``role`` only in the first chunk, then ``{"content": ...}``; a finish chunk with
        ``delta: {}``; with ``include_usage`` a usage chunk whose ``choices`` is ``[]``; ``[DONE]``.
        ``max_completion_tokens`` is not a field Ollama reads: only ``max_tokens`` limits. Errors have
        the type of their status (``NewError``). A runner that dies mid-stream: Ollama's ``{"error"}``
        object goes through ``ChatWriter``, which turns it into one chunk with an empty ``model`` and
        ``delta: {"content": ""}``, and the stream ends without a finish chunk or ``[DONE]``.
        """
        body = self.body_or_error(openai=True)
        if body is None:
            return
        requested = body.get("model")
        messages = body.get("messages")
        if messages is not None and not isinstance(messages, list):
            self.send_error_json(400, "invalid message format", openai=True)
            return
        if not messages:
            self.send_error_json(400, "[] is too short - 'messages'", openai=True)
            return
        if not requested:
            self.send_error_json(400, "model is required", openai=True)
            return
        model = self.model_or_404(requested, openai=True)
        if model is None:
            return
        if "completion" not in model.get("capabilities", ["completion"]):
            self.send_error_json(400, f"{json.dumps(requested)} does not support chat", openai=True)
            return
        # The OpenAI endpoint sets no num_ctx and no keep_alive: the model's own context (Modelfile, else
        # the default) and, for a loaded model, its own keep-alive.
        runner = self.load(model, self.num_ctx_of(model, None), UNSET, openai=True)
        if runner is None:
            return
        try:
            self._openai_answer(body, runner, requested, messages)
        finally:
            self.st.scheduler.release(runner)

    def _openai_answer(self, body: dict, runner: Runner, requested: str, messages: list) -> None:
        limit = body.get("max_tokens")
        ident, created = f"chatcmpl-{random.randint(0, 998)}", int(time.time())
        prompt_tokens = count_words(message_text(messages)) + 4 * len(messages)
        base = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": requested,
            "system_fingerprint": "fp_ollama",
        }
        if body.get("stream") is not True:
            try:
                tokens, reason, _ = self.produce(runner, limit, lambda token: None)
            except RunnerDied as exc:
                self.send_error_json(500, str(exc), openai=True)
                return
            self.send_json(
                200,
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(tokens)},
                            "finish_reason": reason,
                        }
                    ],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": len(tokens),
                        "total_tokens": prompt_tokens + len(tokens),
                    },
                },
            )
            return
        sent = []

        def chunk(token: str) -> None:
            if not sent:
                self.start_stream("text/event-stream")
            delta = {"content": token} if sent else {"role": "assistant", "content": token}
            self.write_sse(compact({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}))
            sent.append(True)

        try:
            tokens, reason, _ = self.produce(runner, limit, chunk)
        except RunnerDied as exc:
            if not sent:
                self.send_error_json(500, str(exc), openai=True)
                return
            self.write_sse(
                compact(
                    {**base, "model": "", "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": None}]}
                )
            )
            self.end_stream()
            return
        if not sent:  # nothing generated: the first (done) response still opens with a role chunk
            chunk("")
        finish = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}
        self.write_sse(compact(finish))
        options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        if options.get("include_usage"):
            self.write_sse(
                compact(
                    {
                        **finish,
                        "choices": [],
                        "usage": {
                            "prompt_tokens": prompt_tokens,
                            "completion_tokens": len(tokens),
                            "total_tokens": prompt_tokens + len(tokens),
                        },
                    }
                )
            )
        self.write_sse("[DONE]")
        self.end_stream()


class StandinServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, settings: dict, store: Store, registry: dict):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.settings = settings
        self.store = store
        self.registry = registry
        self.scheduler = Scheduler(settings)
        super().__init__(address, Handler)


# ------------------------------------------------------------------------------------------ main


def env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip()
    return env_bool(name) if raw else default


def env_seconds(name: str) -> float | None:
    """A Go duration or whole seconds, as envconfig reads OLLAMA_LOAD_TIMEOUT; None when unset or not positive."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return 300.0
    try:
        seconds = parse_go_duration(raw)
    except BadRequest:
        try:
            seconds = float(int(raw))
        except ValueError:
            return 300.0
    return seconds if seconds > 0 else None


def settings_from_env() -> dict:
    flash = env_bool("OLLAMA_FLASH_ATTENTION")
    cache_type = os.environ.get("OLLAMA_KV_CACHE_TYPE", "").strip().lower() or "f16"
    unload = os.environ.get("STANDIN_UNLOAD_SECONDS", "").strip() or "0.5"
    fail_after = os.environ.get("STANDIN_STREAM_FAIL_AFTER", "").strip()
    return {
        "keep_alive": keep_alive_from_env(os.environ.get("OLLAMA_KEEP_ALIVE", "") or "5m"),
        "parallel": max(env_int("OLLAMA_NUM_PARALLEL", 1), 1),
        "max_loaded": max(env_int("OLLAMA_MAX_LOADED_MODELS", 0), 0),
        "context_length": max(env_int("OLLAMA_CONTEXT_LENGTH", 2048), 4),
        "flash_attention": flash,
        "kv_bytes": KV_BYTES.get(cache_type, 2.0) if flash else 2.0,
        "max_queue": max(env_int("OLLAMA_MAX_QUEUE", 512), 0),
        "load_timeout": env_seconds("OLLAMA_LOAD_TIMEOUT"),
        "pull_seconds": max(env_float("STANDIN_PULL_SECONDS", 1.0), 0.0),
        "pull_silent_seconds": max(env_float("STANDIN_PULL_SILENT_SECONDS", 0.0), 0.0),
        "load_seconds": max(env_float("STANDIN_LOAD_SECONDS", 0.2), 0.0),
        "token_seconds": max(env_float("STANDIN_TOKEN_SECONDS", 0.01), 0.0),
        "gpu": os.environ.get("STANDIN_GPU", "").strip() == "1",
        "vram_bytes": max(env_int("STANDIN_VRAM_BYTES", 0), 0),
        "vram_used_elsewhere": max(env_int("STANDIN_VRAM_USED_ELSEWHERE", 0), 0),
        "unload_seconds": None if unload == "off" else max(env_float("STANDIN_UNLOAD_SECONDS", 0.5), 0.0),
        "serial_loads": env_flag("STANDIN_SERIAL_LOADS", True),
        "ps_waits": env_flag("STANDIN_PS_WAITS_FOR_LOADS", True),
        "abort_on_disconnect": env_flag("STANDIN_ABORT_ON_DISCONNECT", True),
        "cap_context": env_flag("STANDIN_CAP_CONTEXT", True),
        "stream_fail_after": max(env_int("STANDIN_STREAM_FAIL_AFTER", 0), 0) if fail_after else None,
    }


def main(argv: list[str]) -> int:
    if argv[:1] in (["-v"], ["--version"], ["version"]):
        print(f"ollama version is {VERSION}", flush=True)
        return 0
    if argv and argv[0] != "serve":
        print(
            f'Error: unknown command "{argv[0]}" for "ollama" (this is the Ollama stand-in; only `serve`)',
            file=sys.stderr,
            flush=True,
        )
        return 1
    if env_bool("STANDIN_FAIL_START"):
        print(
            "Error: STANDIN_FAIL_START is set: the Ollama stand-in simulates a server that cannot start",
            file=sys.stderr,
            flush=True,
        )
        return 1
    try:
        host, port = parse_listen(os.environ.get("OLLAMA_HOST", ""))
        registry = load_registry()
    except ValueError as exc:
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        return 1
    settings = settings_from_env()
    store = Store(Path(os.environ.get("OLLAMA_MODELS", "").strip() or Path.home() / ".ollama" / "models"))
    try:
        store.prepare()
    except OSError as exc:
        print(f"Error: mkdir {store.root}: {exc.strerror}", file=sys.stderr, flush=True)
        return 1
    keep_alive = settings["keep_alive"]
    env = {  # the effective values, as Ollama prints them
        "OLLAMA_CONTEXT_LENGTH": settings["context_length"],
        "OLLAMA_FLASH_ATTENTION": str(settings["flash_attention"]).lower(),
        "OLLAMA_HOST": f"http://{host}:{port}",
        "OLLAMA_KEEP_ALIVE": "forever" if keep_alive is None else f"{keep_alive:g}s",
        "OLLAMA_KV_CACHE_TYPE": os.environ.get("OLLAMA_KV_CACHE_TYPE", ""),
        "OLLAMA_LOAD_TIMEOUT": "forever" if settings["load_timeout"] is None else f"{settings['load_timeout']:g}s",
        "OLLAMA_MAX_LOADED_MODELS": settings["max_loaded"],
        "OLLAMA_MAX_QUEUE": settings["max_queue"],
        "OLLAMA_MODELS": store.root,
        "OLLAMA_NUM_PARALLEL": settings["parallel"],
    }
    log("INFO", "server config", env="map[" + " ".join(f"{k}:{v}" for k, v in env.items()) + "]")
    log(
        "INFO",
        "this is a STAND-IN for Ollama: canned tokens, no model runs",
        registry=",".join(registry) or "-",
        pull_seconds=settings["pull_seconds"],
        load_seconds=settings["load_seconds"],
        token_seconds=settings["token_seconds"],
        gpu=settings["gpu"],
        vram_bytes=settings["vram_bytes"],
        unload_seconds=settings["unload_seconds"],
        stream_fail_after=settings["stream_fail_after"],
    )
    try:
        server = StandinServer((host, port), settings, store, registry)
    except OSError as exc:
        reason = "address already in use" if exc.errno == 98 else (exc.strerror or str(exc))
        print(f"Error: listen tcp {host}:{port}: bind: {reason}", file=sys.stderr, flush=True)
        return 1
    log("INFO", f"Listening on {host}:{port} (version {VERSION})")
    gpu = settings["gpu"] or settings["vram_bytes"] > 0
    log(
        "INFO",
        "inference compute",
        id="0" if gpu else "cpu",
        library="cuda" if gpu else "cpu",
        models=len(store.list()),
    )

    stopping = threading.Event()

    def reaper() -> None:  # keep_alive expiry, as Ollama's timers do
        while not stopping.wait(0.1):
            server.scheduler.tick()

    def on_signal(signum, _frame) -> None:
        if not stopping.is_set():
            stopping.set()
            log("INFO", "received signal, shutting down", signal=signal.Signals(signum).name)
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=reaper, daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
    log("INFO", "server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
