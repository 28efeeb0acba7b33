"""A STAND-IN for Ollama, for tests only: it is NOT Ollama and runs no model.

No registry reachable from the test machines ships an Ollama image, so localllm's Ollama backend
is tested against this program instead. It speaks the subset of Ollama's documented HTTP API
(docs/api.md of ollama/ollama, and its OpenAI-compatible ``/v1`` endpoints) that localllm uses,
with the same request and response shapes, and mirrors the behaviour that matters to a
supervisor: a model store on disk that survives restarts, pulls with NDJSON progress, loads and
unloads with ``keep_alive``, expiry, ``OLLAMA_MAX_LOADED_MODELS`` eviction, a reload when a
request's ``num_ctx`` differs from the loaded one, and ``/api/ps`` memory figures. The "registry"
is a JSON object in ``STANDIN_REGISTRY``; a pull writes a small manifest into ``OLLAMA_MODELS``
(no weights are ever stored) and generated text is canned tokens. Python standard library only.

Endpoints: ``GET|HEAD /``, ``GET /api/version``, ``GET /api/tags``, ``GET /api/ps``,
``POST /api/pull``, ``POST /api/generate``, ``POST /api/chat``, ``POST /api/show``,
``DELETE /api/delete``, ``GET /v1/models``, ``GET /v1/models/{model}``, ``POST /v1/chat/completions``.

Environment (real Ollama's names where it has one):

    OLLAMA_HOST               listen address, default 127.0.0.1:11434 (the image sets 0.0.0.0:11434, as Ollama's does)
    OLLAMA_MODELS             model store, default ~/.ollama/models
    OLLAMA_KEEP_ALIVE         default keep-alive of a load, default 5m; negative = forever
    OLLAMA_NUM_PARALLEL       slots per loaded model (its ``num_ctx`` is multiplied by it), default 1
    OLLAMA_MAX_LOADED_MODELS  0 = no limit (default); else a load beyond it evicts an idle model
    OLLAMA_CONTEXT_LENGTH     ``num_ctx`` of a request that sets none (the OpenAI endpoint never does), default 2048
    OLLAMA_FLASH_ATTENTION    echoed; with it, OLLAMA_KV_CACHE_TYPE (f16|q8_0|q4_0) scales the KV cache
    STANDIN_REGISTRY          JSON {"name:tag": {"size": ..., ...}} that pulls can fetch (default: two small models)
    STANDIN_PULL_SECONDS      how long a pull takes, default 1.0
    STANDIN_LOAD_SECONDS      how long a load takes, default 0.2
    STANDIN_TOKEN_SECONDS     delay per generated token, default 0.01
    STANDIN_GPU               "1": ``size_vram`` = ``size`` in /api/ps; else 0 (a CPU-only host)
    STANDIN_FAIL_START        "1": print an error and exit 1 at start

A loaded model's ``size`` in /api/ps is the model's size plus an f16 KV cache:
``2 * block_count * embedding_length * head_count_kv / head_count * num_ctx * num_parallel * 2`` bytes.
A registry entry may carry ``"load_error": "text"``: loading it then fails with HTTP 500 and that text.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import signal
import socket
import sys
import threading
import time
import traceback
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
CANNED = ["Hello", " from", " the", " Ollama", " stand", "-in", ":", " no", " model", " ran", ",",
          " these", " are", " canned", " tokens", "."]
DEFAULT_REGISTRY = {
    "llama3.2:1b": {"size": 1321098329, "parameter_size": "1.2B", "quantization_level": "Q8_0",
                    "parameter_count": 1235814432, "block_count": 16, "embedding_length": 2048,
                    "head_count": 32, "head_count_kv": 8, "context_length": 131072},
    "qwen2.5:0.5b": {"size": 397821319, "parameter_size": "494.03M", "quantization_level": "Q4_K_M",
                     "family": "qwen2", "parameter_count": 494032768, "block_count": 24, "embedding_length": 896,
                     "head_count": 14, "head_count_kv": 2, "context_length": 32768},
}
KV_BYTES = {"f16": 2.0, "q8_0": 1.0625, "q4_0": 0.5625}
TEMPLATE = "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}"
NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
GO_DURATION = re.compile(r"^[+-]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+$")
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
    """(host, namespace, model, tag) of an Ollama model name; the tag defaults to ``latest``."""
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
    """The shortest form, as /api/tags shows it: ``llama3.2:1b``, ``user/model:tag``, ``host/ns/model:tag``."""
    host, namespace, model, tag = parts
    if host == DEFAULT_HOST and namespace == DEFAULT_NAMESPACE:
        return f"{model}:{tag}"
    if host == DEFAULT_HOST:
        return f"{namespace}/{model}:{tag}"
    return f"{host}/{namespace}/{model}:{tag}"


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
            value = value[len(scheme):]
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
    """A registry model with defaults filled; its layers (weights, template, config) sum to ``size``."""
    family = raw.get("family", "llama")
    size = int(raw.get("size", 500_000_000))
    parameter_size = raw.get("parameter_size")
    parameter_count = raw.get("parameter_count") or (parameter_count_of(parameter_size) if parameter_size else None)
    parameter_count = int(parameter_count or 1_000_000_000)
    if not parameter_size:
        parameter_size = f"{parameter_count / 1e9:.1f}B" if parameter_count >= 1e9 else f"{parameter_count / 1e6:.2f}M"
    entry = {
        "name": name,
        "size": size,
        "details": {"parent_model": "", "format": raw.get("format", "gguf"), "family": family,
                    "families": [family], "parameter_size": parameter_size,
                    "quantization_level": raw.get("quantization_level", "Q4_0")},
        "architecture": raw.get("architecture", family),
        "parameter_count": parameter_count,
        "block_count": int(raw.get("block_count", 16)),
        "embedding_length": int(raw.get("embedding_length", 2048)),
        "head_count": int(raw.get("head_count", 32)),
        "head_count_kv": int(raw.get("head_count_kv", raw.get("head_count", 8))),
        "context_length": int(raw.get("context_length", 4096)),
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
    entry["config"] = {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": digest("config"),
                       "size": size - weights - template_size}
    return entry


def load_registry() -> dict[str, dict]:
    raw = os.environ.get("STANDIN_REGISTRY", "").strip()
    offered = json.loads(raw) if raw else DEFAULT_REGISTRY
    if not isinstance(offered, dict):
        raise ValueError("STANDIN_REGISTRY must be a JSON object of model name to properties")
    registry = {}
    for name, properties in offered.items():
        normal = normal_name(name)
        if normal is None:
            raise ValueError(f"STANDIN_REGISTRY: invalid model name {name!r}")
        registry[normal] = registry_entry(normal, properties or {})
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

    def path(self, name: str) -> Path:
        host, namespace, model, tag = parse_name(name)
        return self.manifests / host / namespace / model / tag

    def write(self, entry: dict) -> None:
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": entry["config"],
            "layers": entry["layers"],
            "standin": {key: value for key, value in entry.items() if key not in ("layers", "config")},
        }
        path = self.path(entry["name"])
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
        model["name"] = name
        model["digest"] = hashlib.sha256(raw).hexdigest()
        model["size"] = sum(int(layer.get("size", 0)) for layer in manifest.get("layers", [])) + \
            int((manifest.get("config") or {}).get("size", 0))
        model["modified_at"] = modified
        model["blob"] = (manifest.get("layers") or [{}])[0].get("digest", "")
        return model

    def get(self, name) -> dict | None:
        normal = normal_name(name)
        if normal is None:
            return None
        path = self.path(normal)
        return self._read(path, normal) if path.is_file() else None

    def delete(self, name) -> bool:
        normal = normal_name(name)
        if normal is None:
            return False
        path = self.path(normal)
        if not path.is_file():
            return False
        path.unlink()
        return True

    def list(self) -> list[dict]:
        models = []
        for path in self.manifests.glob("*/*/*/*"):
            if path.name.startswith(".") or not path.is_file():
                continue
            host, namespace, model, tag = path.relative_to(self.manifests).parts
            found = self._read(path, display_name((host, namespace, model, tag)))
            if found:
                models.append(found)
        models.sort(key=lambda m: m["modified_at"], reverse=True)  # newest first, as Ollama lists
        return models


# ------------------------------------------------------------------------------------------ the scheduler

class LoadFailed(Exception):
    pass


class Runner:
    """A loaded model: what real Ollama runs as a llama runner subprocess."""

    def __init__(self, model: dict, num_ctx: int, parallel: int, session: float | None, kv_bytes: float):
        self.name = model["name"]
        self.model = model
        self.num_ctx = num_ctx  # per slot, as requested
        self.parallel = parallel
        self.session = session  # keep-alive seconds; None = forever; 0 = unload when idle
        self.refcount = 0
        self.expires_at: float | None = None  # wall clock, set when it goes idle with a finite keep-alive
        self.ready = threading.Event()
        self.error: str | None = None
        self.last_used = time.monotonic()
        self.slots = threading.Semaphore(parallel)
        self.size = memory_size(model, num_ctx * parallel, kv_bytes)


def memory_size(model: dict, context: int, kv_bytes: float) -> int:
    heads = model.get("head_count") or 1
    kv_width = (model.get("embedding_length") or 0) * (model.get("head_count_kv") or heads) / heads
    kv = 2 * (model.get("block_count") or 0) * kv_width * context * kv_bytes
    return int(model["size"] + kv)


class Scheduler:
    def __init__(self, settings: dict):
        self.settings = settings
        self.cond = threading.Condition()
        self.loaded: dict[str, Runner] = {}

    def acquire(self, model: dict, num_ctx: int, keep_alive) -> Runner:
        """The loaded runner of ``model`` with ``num_ctx`` (loading, reloading or evicting as Ollama does)."""
        settings, name = self.settings, model["name"]
        num_ctx = max(int(num_ctx), 4)
        with self.cond:
            while True:
                self._expire_due()
                runner = self.loaded.get(name)
                if runner is not None and runner.num_ctx == num_ctx:
                    runner.refcount += 1
                    runner.expires_at = None
                    runner.last_used = time.monotonic()
                    if keep_alive is not UNSET:
                        runner.session = keep_alive
                    fresh = False
                    break
                if runner is not None:  # the runner options differ: reload once it is idle
                    if runner.refcount == 0:
                        self._unload(runner, "reloading: runner options changed",
                                     num_ctx_loaded=runner.num_ctx, num_ctx_requested=num_ctx)
                        continue
                    self.cond.wait(0.1)
                    continue
                limit = settings["max_loaded"]
                if limit > 0 and len(self.loaded) >= limit:
                    idle = [r for r in self.loaded.values() if r.refcount == 0]
                    if not idle:
                        self.cond.wait(0.1)
                        continue
                    victim = min(idle, key=lambda r: (math.inf if r.session is None else r.session, r.last_used))
                    self._unload(victim, "max loaded models reached, unloading one to make room",
                                 OLLAMA_MAX_LOADED_MODELS=limit)
                    continue
                session = settings["keep_alive"] if keep_alive is UNSET else keep_alive
                runner = Runner(model, num_ctx, settings["parallel"], session, settings["kv_bytes"])
                runner.refcount = 1
                self.loaded[name] = runner
                fresh = True
                break
        if fresh:
            log("INFO", "loading model", model=name, num_ctx=num_ctx * runner.parallel, parallel=runner.parallel,
                size=runner.size, keep_alive="forever" if runner.session is None else f"{runner.session:g}s")
            time.sleep(settings["load_seconds"])
            error = model.get("load_error")
            if error:
                with self.cond:
                    runner.error = str(error)
                    runner.refcount -= 1
                    if self.loaded.get(name) is runner:
                        del self.loaded[name]
                    self.cond.notify_all()
                runner.ready.set()
                log("ERROR", "error loading model", model=name, error=str(error))
                raise LoadFailed(str(error))
            runner.ready.set()
            log("INFO", "loaded model", model=name, size=runner.size,
                size_vram=runner.size if settings["gpu"] else 0)
        else:
            runner.ready.wait()
            if runner.error:
                with self.cond:
                    runner.refcount -= 1
                    self.cond.notify_all()
                raise LoadFailed(runner.error)
        return runner

    def release(self, runner: Runner) -> None:
        with self.cond:
            runner.refcount -= 1
            runner.last_used = time.monotonic()
            if runner.refcount <= 0 and self.loaded.get(runner.name) is runner:
                if runner.session == 0:
                    self._unload(runner, "keep_alive 0: unloading when idle")
                elif runner.session is not None:
                    runner.expires_at = time.time() + runner.session
            self.cond.notify_all()

    def expire(self, name: str) -> None:
        """keep_alive 0 with nothing to generate: unload now, or as soon as the model is idle."""
        with self.cond:
            runner = self.loaded.get(name)
            if runner is None:
                return
            runner.session = 0
            if runner.refcount <= 0:
                self._unload(runner, "unload requested (keep_alive 0)")
            self.cond.notify_all()

    def tick(self) -> None:
        with self.cond:
            self._expire_due()

    def _expire_due(self) -> None:
        now = time.time()
        for runner in list(self.loaded.values()):
            if runner.refcount <= 0 and runner.expires_at is not None and now >= runner.expires_at:
                self._unload(runner, "keep_alive expired")

    def _unload(self, runner: Runner, why: str, **fields) -> None:
        if self.loaded.get(runner.name) is runner:
            del self.loaded[runner.name]
            log("INFO", "unloaded model", model=runner.name, reason=why, **fields)
        self.cond.notify_all()

    def running(self) -> list[dict]:
        with self.cond:
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
                entries.append((expires, {
                    "name": runner.name, "model": runner.name, "size": runner.size, "digest": model["digest"],
                    "details": model.get("details", {}), "expires_at": go_time(expires),
                    "size_vram": runner.size if self.settings["gpu"] else 0,
                }))
        entries.sort(key=lambda pair: pair[0], reverse=True)
        return [entry for _, entry in entries]


# ------------------------------------------------------------------------------------------ generation

def plan_tokens(limit) -> tuple[list[str], str]:
    """The canned answer, cut at ``limit`` tokens (num_predict / max_tokens; negative or absent = no limit)."""
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit < 0 or limit > len(CANNED):
        return list(CANNED), "stop"
    return CANNED[:int(limit)], "length"


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


# ------------------------------------------------------------------------------------------ HTTP

class ClientGone(Exception):
    pass


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
            ("GET", "/"): self.root, ("HEAD", "/"): self.root,
            ("GET", "/api/version"): self.version, ("HEAD", "/api/version"): self.version,
            ("GET", "/api/tags"): self.tags, ("HEAD", "/api/tags"): self.tags,
            ("GET", "/api/ps"): self.ps,
            ("POST", "/api/pull"): self.pull,
            ("POST", "/api/generate"): self.generate,
            ("POST", "/api/chat"): self.chat,
            ("POST", "/api/show"): self.show,
            ("DELETE", "/api/delete"): self.delete,
            ("GET", "/v1/models"): self.openai_models,
            ("POST", "/v1/chat/completions"): self.openai_chat,
        }
        route = routes.get((self.command, path))
        if route is None and self.command == "GET" and path.startswith("/v1/models/"):
            route = lambda: self.openai_model(path[len("/v1/models/"):])  # noqa: E731
        try:
            self.body_bytes = self._read_body()
            if route is None:
                self.send_text(404, "404 page not found")  # gin's answer to an unknown route
            else:
                route()
        except ClientGone:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            self.status = self.status or 499
        except Exception as exc:  # a bug of the stand-in: say so in the log and to the client, keep serving
            log("ERROR", "stand-in bug while handling a request", error=repr(exc),
                traceback=json.dumps(traceback.format_exc()))
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
            self.send_error_json(400, str(exc), openai, "invalid_request_error")
            return None

    def send_error_json(self, status: int, message: str, openai: bool = False, kind: str = "api_error") -> None:
        if openai:
            self.send_json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})
        else:
            self.send_json(status, {"error": message})

    # -- shared pieces

    @property
    def st(self) -> StandinServer:
        return self.server

    def model_or_404(self, name, openai: bool = False, message: str | None = None) -> dict | None:
        model = self.st.store.get(name)
        if model is None:
            self.send_error_json(404, message or f'model "{name}" not found, try pulling it first', openai)
        return model

    def num_ctx_of(self, options) -> int:
        value = (options or {}).get("num_ctx") if isinstance(options, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return int(value)
        return self.st.settings["context_length"]

    def load(self, model: dict, num_ctx: int, keep_alive, openai: bool = False) -> Runner | None:
        try:
            return self.st.scheduler.acquire(model, num_ctx, keep_alive)
        except LoadFailed as exc:
            self.send_error_json(500, str(exc), openai)
            return None

    def produce(self, runner: Runner, limit, on_token) -> tuple[list[str], str, int]:
        tokens, reason = plan_tokens(limit)
        started = time.monotonic_ns()
        with runner.slots:  # OLLAMA_NUM_PARALLEL requests at once per model; the rest wait
            for token in tokens:
                time.sleep(self.st.settings["token_seconds"])
                on_token(token)
        return tokens, reason, time.monotonic_ns() - started

    # -- routes

    def root(self) -> None:
        self.send_text(200, "Ollama is running")

    def version(self) -> None:
        self.send_json(200, {"version": VERSION})

    def tags(self) -> None:
        self.send_json(200, {"models": [{
            "name": m["name"], "model": m["name"], "modified_at": go_time(m["modified_at"]), "size": m["size"],
            "digest": m["digest"], "details": m.get("details", {}),
        } for m in self.st.store.list()]})

    def ps(self) -> None:
        self.send_json(200, {"models": self.st.scheduler.running()})

    def pull(self) -> None:
        body = self.body_or_error()
        if body is None:
            return
        name = normal_name(body.get("model") or body.get("name"))
        if name is None:
            self.send_error_json(400, "invalid model name")
            return
        stream = body.get("stream") is not False
        entry = self.st.registry.get(name)
        present = self.st.store.get(name) is not None
        pull_seconds = 0.0 if present else self.st.settings["pull_seconds"]
        log("INFO", "pulling model", model=name, offered=entry is not None, already_present=present)
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
        emit({"status": "writing manifest"})
        self.st.store.write(entry)
        log("INFO", "pulled model", model=name, size=entry["size"])
        if stream:
            emit({"status": "success"})
            self.end_stream()
        else:
            self.send_json(200, {"status": "success"})

    def show(self) -> None:
        body = self.body_or_error()
        if body is None:
            return
        name = body.get("model") or body.get("name")
        model = self.st.store.get(name) if normal_name(name) else None
        if model is None:
            self.send_error_json(404, f"model '{name}' not found")
            return
        arch = model.get("architecture", "llama")
        info = {
            "general.architecture": arch,
            "general.parameter_count": model.get("parameter_count"),
            "general.quantization_version": 2,
            f"{arch}.block_count": model.get("block_count"),
            f"{arch}.context_length": model.get("context_length"),
            f"{arch}.embedding_length": model.get("embedding_length"),
            f"{arch}.attention.head_count": model.get("head_count"),
            f"{arch}.attention.head_count_kv": model.get("head_count_kv"),
        }
        blob = self.st.store.root / "blobs" / model.get("blob", "").replace(":", "-")
        modelfile = (f'# Modelfile generated by "ollama show"\n# To build a new Modelfile based on this, replace FROM with:'
                     f'\n# FROM {model["name"]}\n\nFROM {blob}\nTEMPLATE """{TEMPLATE}"""\n')
        self.send_json(200, {"modelfile": modelfile, "parameters": "", "template": TEMPLATE,
                             "details": model.get("details", {}), "model_info": info,
                             "modified_at": go_time(model["modified_at"])})

    def delete(self) -> None:
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
        """/api/generate and /api/chat: load, unload or generate."""
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
        started = time.monotonic_ns()
        runner = self.load(model, self.num_ctx_of(body.get("options")), keep_alive)
        if runner is None:
            return
        try:
            loaded = time.monotonic_ns()
            if empty:
                self.send_json(200, reply("", True, done_reason="load"))
                return
            stream = body.get("stream") is not False
            if stream:
                self.start_stream("application/x-ndjson")
            options = body.get("options") if isinstance(body.get("options"), dict) else {}
            prompt_count = count_words(text)
            tokens, reason, eval_ns = self.produce(
                runner, options.get("num_predict"),
                (lambda token: self.write_ndjson(reply(token, False))) if stream else (lambda token: None))
            stats = {"done_reason": reason, "total_duration": time.monotonic_ns() - started,
                     "load_duration": loaded - started, "prompt_eval_count": prompt_count,
                     "prompt_eval_duration": 1_000_000, "eval_count": len(tokens), "eval_duration": eval_ns}
            if not chat:
                stats["context"] = list(range(1, prompt_count + len(tokens) + 1))
            if stream:
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

    def openai_models(self) -> None:
        self.send_json(200, {"object": "list", "data": [
            {"id": m["name"], "object": "model", "created": int(m["modified_at"]), "owned_by": "library"}
            for m in self.st.store.list()]})

    def openai_model(self, name: str) -> None:
        model = self.st.store.get(name) if normal_name(name) else None
        if model is None:
            self.send_error_json(404, f"model '{name}' not found", openai=True, kind="invalid_request_error")
            return
        self.send_json(200, {"id": model["name"], "object": "model", "created": int(model["modified_at"]),
                             "owned_by": "library"})

    def openai_chat(self) -> None:
        body = self.body_or_error(openai=True)
        if body is None:
            return
        requested = body.get("model")
        if not requested:
            self.send_error_json(400, "model is required", openai=True, kind="invalid_request_error")
            return
        messages = body.get("messages")
        if not isinstance(messages, list):
            self.send_error_json(400, "invalid message format", openai=True, kind="invalid_request_error")
            return
        model = self.model_or_404(requested, openai=True)
        if model is None:
            return
        # The OpenAI endpoint sets no num_ctx and no keep_alive: the default context and the model's own keep-alive.
        runner = self.load(model, self.st.settings["context_length"], UNSET, openai=True)
        if runner is None:
            return
        try:
            limit = body.get("max_completion_tokens", body.get("max_tokens"))
            ident, created = f"chatcmpl-{random.randint(0, 998)}", int(time.time())
            prompt_tokens = count_words(message_text(messages)) + 4 * len(messages)
            base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": requested,
                    "system_fingerprint": "fp_ollama"}
            if body.get("stream") is True:
                self.start_stream("text/event-stream")

                def chunk(token: str) -> None:
                    self.write_sse(compact({**base, "choices": [{
                        "index": 0, "delta": {"role": "assistant", "content": token}, "finish_reason": None}]}))

                tokens, reason, _ = self.produce(runner, limit, chunk)
                self.write_sse(compact({**base, "choices": [{
                    "index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": reason}]}))
                options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
                if options.get("include_usage"):
                    self.write_sse(compact({**base, "choices": [], "usage": {
                        "prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                        "total_tokens": prompt_tokens + len(tokens)}}))
                self.write_sse("[DONE]")
                self.end_stream()
            else:
                tokens, reason, _ = self.produce(runner, limit, lambda token: None)
                self.send_json(200, {**base, "object": "chat.completion", "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": "".join(tokens)}, "finish_reason": reason}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                              "total_tokens": prompt_tokens + len(tokens)}})
        finally:
            self.st.scheduler.release(runner)


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

def settings_from_env() -> dict:
    flash = env_bool("OLLAMA_FLASH_ATTENTION")
    cache_type = os.environ.get("OLLAMA_KV_CACHE_TYPE", "").strip().lower() or "f16"
    return {
        "keep_alive": keep_alive_from_env(os.environ.get("OLLAMA_KEEP_ALIVE", "") or "5m"),
        "parallel": max(env_int("OLLAMA_NUM_PARALLEL", 1), 1),
        "max_loaded": max(env_int("OLLAMA_MAX_LOADED_MODELS", 0), 0),
        "context_length": max(env_int("OLLAMA_CONTEXT_LENGTH", 2048), 4),
        "flash_attention": flash,
        "kv_bytes": KV_BYTES.get(cache_type, 2.0) if flash else 2.0,
        "pull_seconds": max(env_float("STANDIN_PULL_SECONDS", 1.0), 0.0),
        "load_seconds": max(env_float("STANDIN_LOAD_SECONDS", 0.2), 0.0),
        "token_seconds": max(env_float("STANDIN_TOKEN_SECONDS", 0.01), 0.0),
        "gpu": os.environ.get("STANDIN_GPU", "").strip() == "1",
    }


def main(argv: list[str]) -> int:
    if argv[:1] in (["-v"], ["--version"], ["version"]):
        print(f"ollama version is {VERSION}", flush=True)
        return 0
    if argv and argv[0] != "serve":
        print(f'Error: unknown command "{argv[0]}" for "ollama" (this is the Ollama stand-in; only `serve`)',
              file=sys.stderr, flush=True)
        return 1
    if env_bool("STANDIN_FAIL_START"):
        print("Error: STANDIN_FAIL_START is set: the Ollama stand-in simulates a server that cannot start",
              file=sys.stderr, flush=True)
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
        "OLLAMA_MAX_LOADED_MODELS": settings["max_loaded"],
        "OLLAMA_MODELS": store.root,
        "OLLAMA_NUM_PARALLEL": settings["parallel"],
    }
    log("INFO", "server config", env="map[" + " ".join(f"{k}:{v}" for k, v in env.items()) + "]")
    log("INFO", "this is a STAND-IN for Ollama: canned tokens, no model runs",
        registry=",".join(registry) or "-", pull_seconds=settings["pull_seconds"],
        load_seconds=settings["load_seconds"], token_seconds=settings["token_seconds"], gpu=settings["gpu"])
    try:
        server = StandinServer((host, port), settings, store, registry)
    except OSError as exc:
        reason = "address already in use" if exc.errno == 98 else (exc.strerror or str(exc))
        print(f"Error: listen tcp {host}:{port}: bind: {reason}", file=sys.stderr, flush=True)
        return 1
    log("INFO", f"Listening on {host}:{port} (version {VERSION})")
    log("INFO", "inference compute", id="0" if settings["gpu"] else "cpu", library="cuda" if settings["gpu"] else "cpu",
        models=len(store.list()))

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
