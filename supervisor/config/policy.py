"""What a config may ask of the host: ``daemon.policy``, and the rules that hold with or without one.

The control API can apply a new config while serving, and a config names the
images, host files, llama-server flags and Ollama environment that localllm
hands to Docker, which is root on the host. The policy bounds that, and only a
restart changes it: an apply is checked against the running policy, and one
that changes the policy is refused (``rollout``).

Some things are refused whatever the config says (``ALWAYS_DENIED_FLAGS``,
``denied_env``): they expose a server, hand its authentication or its files to
someone else, or reach outside the container. The rest is allow-lists, which
apply only when ``daemon.policy`` is present, so a config without one keeps
working as before.

Pure rules: the only I/O here is resolving real paths (symlinks) against
``models_root``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import field_validator

from supervisor.config.schema import Problem, Strict

if TYPE_CHECKING:
    from supervisor.config.profiles import Profile
    from supervisor.config.settings import Config, ModelEntry

# llama-server flags refused in extra_args whatever the policy says (common/arg.cpp spellings, llama.cpp b11312).
ALWAYS_DENIED_FLAGS = {
    **dict.fromkeys(("--host", "--port", "--reuse-port"), "it would expose the server, or share its port"),
    **dict.fromkeys(("--api-key", "--api-key-file"), "localllm's proxy does the authentication"),
    **dict.fromkeys(
        (
            "--path",
            "--media-path",
            "--slot-save-path",
            "--log-file",
            "--log-prompts-dir",
            "--models-dir",
            "--models-preset",
        ),
        "it serves, reads or writes files outside the model",
    ),
    **dict.fromkeys(
        (
            "--tools",
            "--tools-runtime",
            "-ag",
            "--agent",
            "--mcp-servers-config",
            "--mcp-servers-json",
            "--ui-mcp-proxy",
            "--webui-mcp-proxy",
        ),
        "it gives clients tools or MCP servers (shell, files)",
    ),
    **dict.fromkeys(
        (
            "-hf",
            "-hfr",
            "--hf-repo",
            "-hff",
            "--hf-file",
            "-hft",
            "--hf-token",
            "-hfd",
            "-hfrd",
            "--hf-repo-draft",
            "--spec-draft-hf",
            "-mu",
            "--model-url",
            "-mmu",
            "--mmproj-url",
            "-dr",
            "--docker-repo",
        ),
        "it downloads a model",
    ),
    **dict.fromkeys(
        ("-md", "--model-draft", "--spec-draft-model", "-mm", "--mmproj"),
        "it loads another model file, which models_root does not check",
    ),
    **dict.fromkeys(
        (
            "--lora",
            "--lora-scaled",
            "--lora-init-without-apply",
            "--control-vector",
            "--control-vector-scaled",
            "--control-vector-layer-range",
        ),
        "it loads extra weights files",
    ),
    "--rpc": "it offloads the model to remote servers",
    "--props": "it lets clients change the server's settings (POST /props)",
}

# extra_args allowed under a policy that does not list its own: sampling, threads, batch, RoPE, logging, and
# server behaviour that changes neither what the server exposes nor the memory localllm sizes it by.
DEFAULT_EXTRA_ARGS = frozenset(
    (
        "-t",
        "--threads",
        "-tb",
        "--threads-batch",
        "--threads-http",
        "-C",
        "--cpu-mask",
        "-Cr",
        "--cpu-range",
        "-Cb",
        "--cpu-mask-batch",
        "-Crb",
        "--cpu-range-batch",
        "--cpu-strict",
        "--cpu-strict-batch",
        "--prio",
        "--prio-batch",
        "--poll",
        "--poll-batch",
        "--numa",
        "-b",
        "--batch-size",
        "--samplers",
        "--sampler-seq",
        "--sampling-seq",
        "-s",
        "--seed",
        "--temp",
        "--temperature",
        "--top-k",
        "--top-p",
        "--min-p",
        "--top-nsigma",
        "--top-n-sigma",
        "--xtc-probability",
        "--xtc-threshold",
        "--typical",
        "--typical-p",
        "--repeat-last-n",
        "--repeat-penalty",
        "--presence-penalty",
        "--frequency-penalty",
        "--dry-multiplier",
        "--dry-base",
        "--dry-allowed-length",
        "--dry-penalty-last-n",
        "--dry-sequence-breaker",
        "--dynatemp-range",
        "--dynatemp-exp",
        "--mirostat",
        "--mirostat-lr",
        "--mirostat-ent",
        "--ignore-eos",
        "-l",
        "--logit-bias",
        "-n",
        "--predict",
        "--n-predict",
        "--keep",
        "--rope-scaling",
        "--rope-scale",
        "--rope-freq-base",
        "--rope-freq-scale",
        "--yarn-orig-ctx",
        "--yarn-ext-factor",
        "--yarn-attn-factor",
        "--yarn-beta-slow",
        "--yarn-beta-fast",
        "--api-prefix",
        "-to",
        "--timeout",
        "--metrics",
        "--no-slots",
        "--no-ui",
        "--no-webui",
        "--cache-reuse",
        "-cb",
        "--cont-batching",
        "-nocb",
        "--no-cont-batching",
        "--context-shift",
        "--no-context-shift",
        "--warmup",
        "--no-warmup",
        "-sps",
        "--slot-prompt-similarity",
        "--cache-prompt",
        "--no-cache-prompt",
        "-dt",
        "--defrag-thold",
        "--jinja",
        "--no-jinja",
        "--chat-template",
        "--reasoning-format",
        "--reasoning-budget",
        "--no-prefill-assistant",
        "--embedding",
        "--embeddings",
        "--pooling",
        "--rerank",
        "--reranking",
        "--log-disable",
        "--log-colors",
        "--log-prefix",
        "--no-log-prefix",
        "--log-timestamps",
        "--no-log-timestamps",
    )
)

# Ollama server environment allowed under a policy that does not list its own (Ollama's envconfig): switches
# that change neither who can reach the server, nor where it reads or writes, nor which GPUs it sees.
DEFAULT_OLLAMA_ENV = (
    "OLLAMA_DEBUG",
    "OLLAMA_KV_CACHE_TYPE",
    "OLLAMA_MAX_QUEUE",
    "OLLAMA_LOAD_TIMEOUT",
    "OLLAMA_GPU_OVERHEAD",
    "OLLAMA_SCHED_SPREAD",
    "OLLAMA_NOPRUNE",
    "OLLAMA_MULTIUSER_CACHE",
    "OLLAMA_NEW_ENGINE",
    "OLLAMA_NOHISTORY",
)

# Environment refused whatever the policy says: the dynamic loader's and the C library's (code injection,
# resolver and locale files), PATH, and the NVIDIA runtime's (it would hand the server GPUs beyond its own).
_DENIED_ENV_PREFIXES = {
    "LD_": "the dynamic loader reads it (code injection)",
    "NVIDIA_": "the NVIDIA runtime reads it (GPUs beyond the server's own)",
}
_DENIED_ENV = {
    "PATH": "it chooses the programs the server runs",
    **dict.fromkeys(
        ("GCONV_PATH", "NLSPATH", "HOSTALIASES", "LOCALDOMAIN", "RES_OPTIONS"),
        "the C library loads files or changes name resolution by it",
    ),
}

_IMAGE_PATTERN = re.compile(r"^(\*|[^*\s]+[:@/]\*|[^*\s]+)$")
_ENV_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\*?$")


class Policy(Strict):
    """``daemon.policy``: read at start, changed only by a restart. Unset keys take the documented defaults."""

    allowed_images: list[str] | None = None  # exact references or NAME:*, NAME@*, PREFIX/*, *; default: the profiles'
    models_root: Path | None = None  # every gguf and ollama.models_dir must resolve inside it; default: anywhere
    allowed_extra_args: list[str] | None = None  # flag spellings; default: DEFAULT_EXTRA_ARGS
    allowed_ollama_env: list[str] | None = None  # names, or PREFIX*; default: DEFAULT_OLLAMA_ENV

    @field_validator("allowed_images")
    @classmethod
    def _image_patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if not _IMAGE_PATTERN.match(pattern):
                raise ValueError(
                    f"'{pattern}': an image reference, or one ending in ':*', '@*' or '/*' (any tag, "
                    "digest or image under a prefix), or '*' alone"
                )
        return patterns

    @field_validator("models_root")
    @classmethod
    def _root_is_absolute(cls, root: Path | None) -> Path | None:
        if root is not None and not root.is_absolute():
            raise ValueError(f"'{root}' must be an absolute path (it bounds configs applied from anywhere)")
        return root

    @field_validator("allowed_extra_args")
    @classmethod
    def _flags_that_may_be_allowed(cls, flags: list[str]) -> list[str]:
        for flag in flags:
            if flag_of(flag) != flag:
                raise ValueError(f"'{flag}' is not a flag spelling such as --temp or -t")
            if flag in ALWAYS_DENIED_FLAGS:
                raise ValueError(f"'{flag}' is never allowed: {ALWAYS_DENIED_FLAGS[flag]}")
        return flags

    @field_validator("allowed_ollama_env")
    @classmethod
    def _env_that_may_be_allowed(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _ENV_PATTERN.match(name):
                raise ValueError(f"'{name}' is not a variable name, or a prefix ending in '*'")
            why = denied_env(name.rstrip("*"))  # a broader pattern (L*) still never lets LD_PRELOAD through
            if why:
                raise ValueError(f"'{name}' is never allowed: {why}")
        return names


def flag_of(arg: str) -> str | None:
    """The llama-server flag ``arg`` names as llama.cpp reads it, or None for a value (``8``, ``-1``, ``/v1``).

    llama.cpp turns ``_`` into ``-`` in a ``--`` flag (``--api_key`` is ``--api-key``); ``--x=1`` is not its
    syntax, but the part before ``=`` is what it would be taken for.
    """
    if not arg.startswith("-") or _is_number(arg):
        return None
    flag = arg.split("=", 1)[0]
    return flag.replace("_", "-") if flag.startswith("--") else flag


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def denied_env(name: str) -> str | None:
    """Why the server's environment may never hold ``name``, or None."""
    for prefix, why in _DENIED_ENV_PREFIXES.items():
        if name.startswith(prefix):
            return why
    return _DENIED_ENV.get(name)


def matches(name: str, patterns: Iterable[str]) -> bool:
    """``name`` is one of ``patterns``, or starts with one that ends in ``*`` (less the ``*``)."""
    return any(name == p or (p.endswith("*") and name.startswith(p[:-1])) for p in patterns)


def escapes(path: Path, root: Path) -> str | None:
    """Why ``path`` is not inside ``root`` once every symlink is resolved, or None (``root`` is a realpath)."""
    real = Path(os.path.realpath(path))
    if root in real.parents:
        return None
    shown = str(path) if real == Path(path) else f"{path} (which resolves to {real})"
    return f"{shown} is outside daemon.policy.models_root {root}"


def policy_problems(
    config: Config, policy: Policy | None, profiles: dict[str, Profile], check_files: bool = True
) -> list[Problem]:
    """Every way ``config`` breaks ``policy`` (None: only the rules that always hold), as (location, reason)."""
    problems = always_denied(config)
    if policy is None:
        return problems
    return (
        problems
        + image_problems(config, policy, profiles)
        + path_problems(config, policy, check_files)
        + extra_arg_problems(config, policy)
        + env_problems(config, policy)
    )


def always_denied(config: Config) -> list[Problem]:
    problems: list[Problem] = []
    for index, entry in enumerate(config.models):
        for position, arg in enumerate(entry.extra_args):
            flag = flag_of(arg)
            if flag in ALWAYS_DENIED_FLAGS:
                problems.append(
                    (
                        ("models", index, "extra_args", position),
                        f"'{arg}' is never allowed: {ALWAYS_DENIED_FLAGS[flag]}",
                    )
                )
    for name in config.ollama.env:
        why = denied_env(name)
        if why:
            problems.append((("ollama", "env", name), f"{name} is never allowed: {why}"))
    return problems


def image_problems(config: Config, policy: Policy, profiles: dict[str, Profile]) -> list[Problem]:
    """Each image named in ``config``, and each profile default it falls back on, must be allowed."""
    allowed = policy.allowed_images
    if allowed is None:
        allowed = sorted(
            {image for p in profiles.values() for image in (p.defaults.images.llamacpp, p.defaults.images.ollama)}
        )
    rule = "is not in daemon.policy.allowed_images"
    problems: list[Problem] = [
        (("models", index, "image"), f"image '{entry.image}' {rule}")
        for index, entry in enumerate(config.models)
        if entry.image is not None and not matches(entry.image, allowed)
    ]
    if config.ollama.image is not None and not matches(config.ollama.image, allowed):
        problems.append((("ollama", "image"), f"image '{config.ollama.image}' {rule}"))
    # A model without an image runs its profile's; under profile: auto that is any profile's the host may match.
    candidates = [profiles[config.profile]] if config.profile in profiles else list(profiles.values())
    own_image: dict[str, Callable[[ModelEntry], str | None]] = {
        "llamacpp": lambda e: e.image,
        "ollama": lambda e: config.ollama.image,
    }
    users = {
        backend: [i for i, e in enumerate(config.models) if e.backend == backend and image_of(e) is None]
        for backend, image_of in own_image.items()
    }
    for backend, indexes in users.items():
        for profile in candidates if indexes else []:
            image = getattr(profile.defaults.images, backend)
            if not matches(image, allowed):
                users_text = ", ".join(f"models[{i}]" for i in indexes)
                problems.append(
                    (
                        ("daemon", "policy", "allowed_images"),
                        f"profile {profile.name}'s {backend} image '{image}', which {users_text} would run, "
                        f"{rule}: allow it, set the image, or name another profile",
                    )
                )
    return problems


def path_problems(config: Config, policy: Policy, check_files: bool) -> list[Problem]:
    """Every gguf, and ollama.models_dir, must resolve inside models_root (no symlink out of it)."""
    if policy.models_root is None:
        return []
    if check_files and not policy.models_root.is_dir():
        return [(("daemon", "policy", "models_root"), f"{policy.models_root} is not a directory")]
    root = Path(os.path.realpath(policy.models_root))
    problems: list[Problem] = [
        (("models", index, "gguf"), why)
        for index, entry in enumerate(config.models)
        if entry.gguf is not None and (why := escapes(entry.gguf, root))
    ]
    store = config.ollama.models_dir
    if store is not None:
        real = Path(os.path.realpath(store))
        default = Path(os.path.realpath(config.daemon.state_dir / "ollama"))
        if real not in (root, default):
            why = escapes(store, root)
            if why:
                problems.append((("ollama", "models_dir"), why))
    return problems


def extra_arg_problems(config: Config, policy: Policy) -> list[Problem]:
    allowed = DEFAULT_EXTRA_ARGS if policy.allowed_extra_args is None else set(policy.allowed_extra_args)
    problems: list[Problem] = []
    for index, entry in enumerate(config.models):
        for position, arg in enumerate(entry.extra_args):
            flag = flag_of(arg)
            if flag is not None and flag not in allowed and flag not in ALWAYS_DENIED_FLAGS:
                problems.append(
                    (("models", index, "extra_args", position), f"'{flag}' is not in daemon.policy.allowed_extra_args")
                )
    return problems


def env_problems(config: Config, policy: Policy) -> list[Problem]:
    allowed = DEFAULT_OLLAMA_ENV if policy.allowed_ollama_env is None else policy.allowed_ollama_env
    return [
        (("ollama", "env", name), f"{name} is not in daemon.policy.allowed_ollama_env")
        for name in config.ollama.env
        if not matches(name, allowed) and denied_env(name) is None
    ]
