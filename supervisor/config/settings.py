"""The daemon config file: which profile, the daemon's settings, the model catalog.

``load_config(path)`` is the only way in. It either returns a validated,
immutable ``Config`` or raises one ``ConfigError`` listing every problem as
``FILE:LINE: field: reason``; nothing is started from a bad file.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from supervisor.config.access import ControlTls, ControlToken, RoleSockets, Token, control_problems, is_loopback
from supervisor.config.policy import Policy, flag_of, policy_problems
from supervisor.config.profiles import Profile, load_profiles
from supervisor.config.schema import Bytes, Problem, Seconds, Strict, describe, read_model
from supervisor.config.serving import Filters, LoadingProgress
from supervisor.core.errors import ConfigError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$"
CacheType = Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"]
UNQUANTIZED = {"f32", "f16", "bf16"}
# llama-server flags localllm sets itself (common/arg.cpp spellings), with the setting that says it instead:
# the memory estimate assumes them, and a later flag on the command line would win.
LLAMA_FLAGS_SET_BY_LOCALLLM = {
    **dict.fromkeys(("-m", "--model"), "gguf"),
    **dict.fromkeys(("-a", "--alias"), "name"),
    **dict.fromkeys(("--host", "--port"), "nothing (llama-server listens on a socket only localllm reaches)"),
    **dict.fromkeys(("-c", "--ctx-size"), "context_size"),
    **dict.fromkeys(("-np", "--parallel"), "parallel"),
    **dict.fromkeys(("-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified"), "nothing yet (localllm pins it off)"),
    **dict.fromkeys(("-ub", "--ubatch-size"), "nothing yet (localllm pins 512)"),
    **dict.fromkeys(("-ctk", "--cache-type-k"), "cache_type_k"),
    **dict.fromkeys(("-ctv", "--cache-type-v"), "cache_type_v"),
    **dict.fromkeys(("-fa", "--flash-attn"), "flash_attention"),
    **dict.fromkeys(
        ("-fit", "--fit", "-fitt", "--fit-target", "-fitc", "--fit-ctx"), "nothing (localllm pins --fit off)"
    ),
    **dict.fromkeys(("-ngl", "--gpu-layers", "--n-gpu-layers"), "gpu_layers"),
    **dict.fromkeys(("-dev", "--device"), "the scheduler's placement"),
}


class ModelEntry(Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=128)
    aliases: list[str] = []
    backend: Literal["llamacpp", "ollama"] = "llamacpp"
    gguf: Path | None = None  # llamacpp: the model file
    tag: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$", max_length=200)  # ollama
    pull: bool = False  # ollama: pull the tag when the server does not have it
    memory: Bytes | None = Field(default=None, gt=0)  # declared need; overrides the estimate
    context_size: int | None = Field(default=None, ge=128)
    parallel: int | None = Field(default=None, ge=1)  # llamacpp: slots (--parallel); default: the profile's
    gpu_layers: int | None = Field(default=None, ge=-1)
    image: str | None = None  # default: the profile's image for the backend
    cache_type_k: CacheType = "f16"
    cache_type_v: CacheType = "f16"
    flash_attention: bool = True  # llamacpp: --flash-attn on|off (never llama.cpp's "auto": the estimate must know)
    extra_args: list[str] = []
    preload: bool = False
    pinned: bool = False
    ttl: Seconds | None = Field(default=None, ge=0)
    startup_timeout: Seconds | None = Field(default=None, gt=0)
    max_concurrent: int | None = Field(default=None, ge=1)  # requests at once; beyond: 429 with Retry-After
    filters: Filters = Filters()  # request fields stripped or forced for this model (config/serving.py)
    loading_progress: LoadingProgress | None = None  # None: daemon.loading_progress

    @field_validator("aliases")
    @classmethod
    def _aliases_are_names(cls, aliases: list[str]) -> list[str]:
        for alias in aliases:
            if not re.match(NAME_PATTERN, alias):
                raise ValueError(f"alias '{alias}' must match {NAME_PATTERN}")
        return aliases

    @field_validator("extra_args")
    @classmethod
    def _extra_args_leave_ours_alone(cls, args: list[str]) -> list[str]:
        for arg in args:
            flag = flag_of(arg)
            if flag in LLAMA_FLAGS_SET_BY_LOCALLLM:
                raise ValueError(
                    f"'{flag}' is set by localllm, which sizes the model's memory by it; "
                    f"set {LLAMA_FLAGS_SET_BY_LOCALLLM[flag]} instead"
                )
        return args

    @field_validator("gguf")
    @classmethod
    def _gguf_relative_to_config(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return relative_to_config(path, info)

    @model_validator(mode="after")
    def _backend_fields(self) -> ModelEntry:
        if self.backend == "llamacpp":
            if self.gguf is None:
                raise ValueError("a llamacpp model needs 'gguf' (the model file)")
            if self.tag is not None or self.pull:
                raise ValueError("'tag' and 'pull' are for backend: ollama")
            if not self.flash_attention and self.cache_type_v not in UNQUANTIZED:
                raise ValueError(
                    f"cache_type_v: {self.cache_type_v} needs flash_attention: true (llama.cpp refuses "
                    "a quantized V cache without flash attention)"
                )
            return self
        if self.tag is None:
            raise ValueError("an ollama model needs 'tag' (its name in Ollama, e.g. llama3.2:1b)")
        if self.context_size is not None:
            raise ValueError(
                "context_size: an Ollama model runs with the server's context (ollama.context_size): "
                "Ollama reloads a model at every request whose context differs"
            )
        llama_only = [name for name in ("gguf", "gpu_layers", "image", "parallel") if getattr(self, name) is not None]
        llama_only += [name for name in ("extra_args",) if getattr(self, name)]
        llama_only += [name for name in ("cache_type_k", "cache_type_v") if getattr(self, name) != "f16"]
        llama_only += [name for name in ("flash_attention",) if not getattr(self, name)]
        if llama_only:
            raise ValueError(
                f"{', '.join(llama_only)}: llama.cpp settings; an ollama model takes tag, pull "
                "and memory, and the ollama: section sets up its server"
            )
        return self

    @property
    def names(self) -> list[str]:
        return [self.name, *self.aliases]


def relative_to_config(path: Path | None, info: ValidationInfo) -> Path | None:
    """Relative paths in a config file mean: relative to that file's directory."""
    if path is None:
        return None
    base = (info.context or {}).get("base_dir")
    path = path.expanduser()
    return (base / path) if base and not path.is_absolute() else path


class Listen(Strict):
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _parse_listen(value: object) -> object:
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"'{value}' is not HOST:PORT (use 0.0.0.0:PORT to listen on every interface)")
        return {"host": host.strip("[]"), "port": int(port)}
    return value


class RestartPolicy(Strict):
    """Replacing a model that crashed or failed to start: exponential backoff, then give up."""

    delay: Seconds = Field(default=1.0, gt=0)
    max_delay: Seconds = Field(default=60.0, gt=0)
    stable_after: Seconds = Field(default=60.0, ge=0)
    max_failures: int = Field(default=5, ge=1)


class Liveness(Strict):
    """Probing running models: a hung server is replaced after ``failure_threshold`` failed probes."""

    period: Seconds = Field(default=10.0, gt=0)
    timeout: Seconds = Field(default=2.0, gt=0)
    failure_threshold: int = Field(default=3, ge=1)


MIN_API_KEY = 32  # characters: `openssl rand -hex 32` gives 64


class ProxyLimits(Strict):
    """The proxy's network edge: deadlines and caps, so that slow or greedy clients hold neither its connections
    nor its memory (README: Security model)."""

    header_timeout: Seconds = Field(default=10.0, gt=0)  # a request's line and headers, from the connection's
    # opening or the request's first byte
    body_timeout: Seconds = Field(default=60.0, gt=0)  # a request's body, once its headers are in
    keep_alive: Seconds = Field(default=5.0, gt=0)  # an idle connection between requests
    max_connections: int = Field(default=4096, ge=1, le=30000)  # open connections, all proxy listeners together
    max_body: Bytes = Field(default=64 * 2**20, gt=0)  # one request body (images travel base64-encoded in chats)
    body_budget: Bytes = Field(default=256 * 2**20, gt=0)  # the bodies of all requests in flight together

    @model_validator(mode="after")
    def _budget_holds_a_body(self) -> ProxyLimits:
        if self.body_budget < self.max_body:
            raise ValueError(
                f"body_budget ({self.body_budget} bytes) is smaller than max_body ({self.max_body} "
                "bytes): a body of max_body could never be accepted"
            )
        return self


class Timeouts(Strict):
    """How long the daemon waits on each peer before it gives up (README: Timeouts): no wait is unbounded."""

    upstream_connect: Seconds = Field(default=5.0, gt=0)  # connecting to a model server's socket or port
    first_byte: Seconds = Field(default=600.0, gt=0)  # a proxied request, until its answer starts (its headers,
    # and a stream's first chunk): a non-streaming answer comes whole, so this bounds its whole generation
    stream_idle: Seconds = Field(default=120.0, gt=0)  # between two chunks of an answer, once it has started
    docker: Seconds = Field(default=60.0, gt=0)  # one Docker API call (a stop: plus its grace)
    ollama: Seconds = Field(default=30.0, gt=0)  # one Ollama API call that does not wait for a model's load


class RequestFields(Strict):
    """What the proxy changes in a request before it forwards it (README: Security model)."""

    # id_slot lets a client pick another user's slot and time its prompt cache; cache_prompt goes with it
    drop: list[Annotated[str, Field(min_length=1)]] = ["id_slot", "cache_prompt"]
    # n_predict, max_tokens and max_completion_tokens above it (or -1) are cut to it, and a request with none
    # gets max_tokens: it; default: the model's context size
    max_tokens: int | None = Field(default=None, ge=1)


class DaemonSettings(Strict):
    instance: str = Field(default="localllmd", pattern=r"^[a-z0-9][a-z0-9_.-]*$", max_length=40)
    proxy_listen: list[Listen] = Field(default_factory=lambda: [Listen(host="127.0.0.1", port=8081)], min_length=1)
    control_socket: Path | None = None  # the admin socket; default: <state_dir>/control.sock
    socket_group: str | None = None  # group (name or gid) given the admin socket; it is made mode 0660
    role_sockets: RoleSockets = {}  # sockets of the viewer and operator roles (access.py)
    control_listen: Listen | None = None  # optional TCP control API; needs control_tokens or control_token
    control_token: Token | None = None  # one admin Bearer token for control_listen (32+ characters)
    control_tokens: list[ControlToken] = []  # Bearer tokens for control_listen, each with its role
    control_tls: ControlTls | None = None  # cert and key: control_listen serves https (needed off loopback)
    port_range: object = None  # no longer used (every server listens on a socket); accepted so older configs load
    state_dir: Path = Path("/var/lib/localllm")
    labels: dict[str, str] = {}
    default_ttl: Seconds = Field(default=1800.0, ge=0)
    startup_timeout: Seconds = Field(default=120.0, gt=0)
    stop_grace: Seconds = Field(default=10.0, ge=0)
    min_residency: Seconds = Field(default=10.0, ge=0)
    max_queue: int = Field(default=256, ge=1)
    queue_timeout: Seconds = Field(default=600.0, gt=0)
    restart: RestartPolicy = RestartPolicy()
    liveness: Liveness = Liveness()
    log_level: Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    api_keys: list[Annotated[str, Field(min_length=MIN_API_KEY)]] = []  # when set, proxy clients must send one
    # as a Bearer token; a proxy_listen beyond loopback needs them, unless allow_anonymous
    allow_anonymous: bool = False
    allowed_hosts: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9._:\[\]-]+$")]] = []  # Host headers the proxy
    # answers (names or addresses, any port); empty: any
    proxy_limits: ProxyLimits = ProxyLimits()
    request_fields: RequestFields = RequestFields()
    timeouts: Timeouts = Timeouts()
    loading_progress: LoadingProgress = "comments"  # what a streaming chat sees while its model loads
    list_aliases: bool = False  # GET /v1/models lists each alias as a model of its own
    docker_url: str | None = None
    policy: Policy | None = None  # what a config may ask of the host; only a restart changes it

    @field_validator("proxy_listen", mode="before")
    @classmethod
    def _listen_list(cls, value: object) -> object:
        items = value if isinstance(value, list) else [value]
        return [_parse_listen(item) for item in items]

    @field_validator("control_listen", mode="before")
    @classmethod
    def _control_listen(cls, value: object) -> object:
        return _parse_listen(value) if value is not None else None

    @property
    def socket_path(self) -> Path:
        return self.control_socket or self.state_dir / "control.sock"


OLLAMA_ENV_SET_BY_LOCALLLM = {
    "OLLAMA_HOST",
    "OLLAMA_MODELS",
    "OLLAMA_KEEP_ALIVE",
    "OLLAMA_NUM_PARALLEL",
    "OLLAMA_FLASH_ATTENTION",
    "OLLAMA_CONTEXT_LENGTH",
    "OLLAMA_MAX_LOADED_MODELS",
    "HOME",
}  # HOME: where the store is mounted for a server that is not root


class OllamaSettings(Strict):
    """The one Ollama server that holds every ``backend: ollama`` model."""

    image: str | None = None  # default: the profile's images.ollama
    models_dir: Path | None = None  # its persistent store; default: <state_dir>/ollama
    keep_alive: str = "-1"  # OLLAMA_KEEP_ALIVE: localllm unloads models itself, so never on Ollama's own
    num_parallel: int = Field(default=1, ge=1)  # OLLAMA_NUM_PARALLEL
    flash_attention: bool = False  # OLLAMA_FLASH_ATTENTION
    context_size: int | None = Field(default=None, ge=128)  # OLLAMA_CONTEXT_LENGTH, for every model; default: profile's
    max_loaded_models: int = Field(default=64, ge=1)  # OLLAMA_MAX_LOADED_MODELS: localllm decides, not Ollama
    env: dict[str, str] = {}  # more environment for the server
    startup_timeout: Seconds = Field(default=60.0, gt=0)
    device: str | None = Field(default=None, pattern=r"^gpu[0-9]+$")  # the one GPU the server sees; default: gpu0

    @field_validator("env")
    @classmethod
    def _env_leaves_ours_alone(cls, env: dict[str, str]) -> dict[str, str]:
        taken = sorted(set(env) & OLLAMA_ENV_SET_BY_LOCALLLM)
        if taken:
            raise ValueError(f"{', '.join(taken)}: set by localllm (use the ollama: settings for them)")
        return env

    @field_validator("models_dir")
    @classmethod
    def _models_dir_relative_to_config(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return relative_to_config(path, info)


class Config(Strict):
    profile: str = "auto"
    profiles_dir: Path | None = None
    daemon: DaemonSettings = DaemonSettings()
    ollama: OllamaSettings = OllamaSettings()
    models: list[ModelEntry] = []
    default_model: str | None = None  # serves requests that name no model (/infill, /tokenize from some clients)

    @property
    def ollama_store(self) -> Path:
        return self.ollama.models_dir or self.daemon.state_dir / "ollama"

    @field_validator("profiles_dir")
    @classmethod
    def _profiles_dir_relative_to_config(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return relative_to_config(path, info)

    def model_named(self, name: str) -> ModelEntry | None:
        for entry in self.models:
            if name in entry.names:
                return entry
        return None


def load_config(path: Path, check_files: bool = True, text: str | None = None, running: Config | None = None) -> Config:
    """Read, validate and cross-check a config file (or its ``text``, sent from elsewhere); raise ConfigError.

    The file is held to its own ``daemon.policy``, or to ``running``'s when given: a config applied to a
    running daemon answers to the policy the daemon started with.
    """
    path = Path(path)
    config, doc = read_model(path, Config, context={"base_dir": path.resolve().parent}, text=text)
    policy = (running or config).daemon.policy
    found = (
        check_ports(config)
        + check_exposure(config)
        + control_problems(config.daemon, check_files)
        + cross_check(config, check_files)
        + check_profile(config)
        + policy_problems(config, policy, known_profiles(config) if policy else {}, check_files)
    )
    problems = [describe(path, doc, loc, reason) for loc, reason in found]
    if problems:
        raise ConfigError(str(path), problems)
    return config


def check_ports(config: Config) -> list[Problem]:
    """The control API needs a port of its own."""
    daemon = config.daemon
    problems: list[Problem] = []
    if daemon.control_listen is not None and daemon.control_listen.port in {lst.port for lst in daemon.proxy_listen}:
        problems.append(
            (
                ("daemon", "control_listen"),
                f"control_listen {daemon.control_listen} uses a proxy_listen "
                "port: the control API needs a port of its own",
            )
        )
    return problems


def check_exposure(config: Config) -> list[Problem]:
    """A proxy that other hosts can reach needs API keys, unless anonymous access is asked for in so many words."""
    daemon = config.daemon
    if daemon.api_keys or daemon.allow_anonymous:
        return []
    return [
        (
            ("daemon", "proxy_listen", index),
            f"{listen} is not a loopback address, and daemon.api_keys is empty: anyone who can reach it could "
            f"use every model. Set daemon.api_keys (each at least {MIN_API_KEY} characters, e.g. from "
            "`openssl rand -hex 32`), listen on 127.0.0.1, or set daemon.allow_anonymous: true",
        )
        for index, listen in enumerate(daemon.proxy_listen)
        if not is_loopback(listen.host)
    ]


def check_profile(config: Config) -> list[Problem]:
    """``profiles_dir`` must load, and a named profile must exist among the built-in and extra ones."""
    if config.profiles_dir is not None and not config.profiles_dir.is_dir():
        return [(("profiles_dir",), f"profiles directory does not exist: {config.profiles_dir}")]
    known = load_profiles(config.profiles_dir)
    if config.profile == "auto" or config.profile in known:
        return []
    return [(("profile",), f"unknown profile '{config.profile}' (known: auto, {', '.join(sorted(known))})")]


def known_profiles(config: Config) -> dict[str, Profile]:
    """The profiles ``config`` may run under (the built-in ones alone when its profiles_dir is missing)."""
    usable = config.profiles_dir is not None and config.profiles_dir.is_dir()
    return load_profiles(config.profiles_dir if usable else None)


def normal_tag(name: str) -> str:
    """Ollama's full name for ``name``, lower-cased: ``host/namespace/model:tag``.

    As Ollama's ParseName (types/model/name.go): the tag is what follows the last ``:`` after the last ``/``
    (so ``myhost:5000/team/x`` has no tag, and keeps its host), then model, namespace and host are cut off
    at the last ``/`` each; a missing part takes the default (registry.ollama.ai, library, latest), and a
    ``scheme://`` before the host is dropped. Ollama compares names case-insensitively (Name.EqualFold).
    """
    rest, tag = name, ""
    if rest.rfind(":") > rest.rfind("/"):
        rest, _, tag = rest.rpartition(":")
    rest, _, model = rest.rpartition("/")
    host, _, namespace = rest.rpartition("/")
    host = host.partition("://")[2] or host
    parts = (host or "registry.ollama.ai", namespace or "library", model)
    return f"{'/'.join(parts)}:{tag or 'latest'}".lower()


def same_tag(a: str, b: str) -> bool:
    """Two Ollama names are the same model as Ollama matches them: ``Llama3`` is ``library/llama3:latest``."""
    return normal_tag(a) == normal_tag(b)


def cross_check(config: Config, check_files: bool = True) -> list[Problem]:
    """Problems that span entries: (location, reason) pairs, in file order."""
    problems: list[Problem] = []
    counts = Counter(name for entry in config.models for name in entry.names)
    first_owner: dict[str, int] = {}
    for index, entry in enumerate(config.models):
        for position, name in enumerate(entry.names):
            loc = ("models", index, "name") if position == 0 else ("models", index, "aliases", position - 1)
            if counts[name] > 1 and name in first_owner:
                problems.append((loc, f"duplicate model name '{name}' (also models[{first_owner[name]}])"))
            first_owner.setdefault(name, index)
        if entry.tag is not None:
            twin = next(
                (
                    i
                    for i, other in enumerate(config.models[:index])
                    if other.tag is not None and same_tag(other.tag, entry.tag)
                ),
                None,
            )
            if twin is not None:
                problems.append(
                    (
                        ("models", index, "tag"),
                        f"tag '{entry.tag}' is also models[{twin}]'s: unloading one would unload the other",
                    )
                )
        if check_files and entry.gguf is not None and not entry.gguf.is_file():
            what = "is not a file" if entry.gguf.exists() else "does not exist"
            problems.append((("models", index, "gguf"), f"model file {entry.gguf} {what}"))
    if config.default_model is not None and config.model_named(config.default_model) is None:
        problems.append((("default_model",), f"'{config.default_model}' is not a model or alias of the catalog"))
    return problems
