"""localllmctl, the operator's CLI: its arguments, and the commands that work on files and this host.

The commands that talk to the daemon are in ctl_daemon.py. Exit statuses (also in the README): 0 success,
1 failure (and ``status --check`` finding the daemon unhealthy, unreachable or not answering within its
deadline), 2 bad input (arguments, config), 3 the daemon (or the Docker engine) is unreachable, or the
daemon did not answer within ``--timeout``.
"""

# PYTHON_ARGCOMPLETE_OK
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from pathlib import Path

from supervisor import __version__
from supervisor.cli.client import ControlClient, quote
from supervisor.cli.daemon_commands import (
    cmd_apply,
    cmd_events,
    cmd_history,
    cmd_load,
    cmd_logs,
    cmd_rollback,
    cmd_status,
    cmd_unload,
)
from supervisor.cli.render import render_estimate, render_ollama_memory, render_profiles
from supervisor.cli.target import add_target_options, add_timeout_option, client, target
from supervisor.config.settings import load_config
from supervisor.core.errors import EXIT_BAD_INPUT, EXIT_OK, BadRequest, LocalllmError
from supervisor.core.estimate import CACHE_TYPE_BYTES

COMPLETION_TIMEOUT = 2.0  # seconds a shell completion waits for the daemon's model names

DEFAULT_CONFIG = Path("/etc/localllm/config.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _enable_completion(parser)
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return args.run(args)
    except LocalllmError as exc:
        print(f"localllmctl: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="localllmctl",
        description="Operate localllmd.",
        epilog="exit status: 0 ok, 1 failed, 2 bad input, 3 daemon or Docker "
        "unreachable, or no answer within --timeout",
    )
    parser.add_argument("--version", action="version", version=f"localllmctl {__version__}")
    add_target_options(parser)
    parser.add_argument("--config", type=Path, help="daemon config file: finds the control socket, the catalog")
    commands = parser.add_subparsers(metavar="COMMAND")

    def command(
        name: str, run, help: str, json_flag: bool = False, daemon: bool = True, **kwargs
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, **kwargs)
        sub.set_defaults(run=run)
        if json_flag:
            sub.add_argument("--json", action="store_true", help="print JSON instead of text")
        if daemon:
            add_timeout_option(sub)
        return sub

    status = command("status", cmd_status, "the daemon and its models", True, aliases=["ps"])
    status.add_argument(
        "--check",
        action="store_true",
        help="exit 0 if the daemon is healthy, 1 if not (or unreachable, or it does not answer "
        "within --timeout, default 5 s); for monitoring",
    )

    model_arg = {"help": "model name or alias"}
    load = command("load", cmd_load, "start a model now and wait until it is ready", True)
    load.add_argument("model", **model_arg).completer = _complete_models
    unload = command("unload", cmd_unload, "stop a model now (refused while it serves requests)", True)
    unload.add_argument("model", **model_arg).completer = _complete_models

    logs = command("logs", cmd_logs, "a model container's output")
    logs.add_argument("model", **model_arg).completer = _complete_models
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("-n", "--tail", type=int, default=100, help="lines from the end to start with (default 100)")

    events = command("events", cmd_events, "what happened: loads, swaps, crashes, restarts, config changes", True)
    events.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    events.add_argument("--model", help="only this model's events").completer = _complete_models
    events.add_argument("-n", "--limit", type=int, default=50, help="recent events to start with (default 50)")

    apply = command(
        "apply",
        cmd_apply,
        "apply a config file to the running daemon: shows the change, then its "
        "progress until it is healthy or rolled back",
        True,
    )
    apply.add_argument("file", type=Path)
    command("history", cmd_history, "the config generations, newest last", True)
    rollback = command(
        "rollback",
        cmd_rollback,
        "apply an earlier generation again (default: the last good one before the active one)",
        True,
    )
    rollback.add_argument("generation", type=int, nargs="?")

    estimate = command("estimate", cmd_estimate, "the memory a model needs, part by part", True)
    estimate.add_argument("model", help="a catalog model (name or alias, with --config) or a GGUF file")
    estimate.add_argument("--profile", help="profile to size for (default: the config's; cpu-only for a bare file)")
    estimate.add_argument("--context", type=int, help="context size (default: the catalog's or the profile's)")
    estimate.add_argument("--parallel", type=int, help="parallel slots (default: the profile's)")
    estimate.add_argument("--gpu-layers", type=int, help="layers to offload (-1: all)")
    estimate.add_argument("--cache-type", choices=sorted(CACHE_TYPE_BYTES), help="KV cache type for K and V")
    estimate.add_argument("--flash-attn", choices=["on", "off"], help="flash attention (default: the catalog's, on)")

    librechat = command(
        "librechat", cmd_librechat, "print a librechat.yaml endpoints block for this daemon", daemon=False
    )
    librechat.add_argument("--name", default="localllm", help="endpoint name (must not start with 'ollama')")
    librechat.add_argument(
        "--host",
        default="host.docker.internal",
        help="how LibreChat's container reaches this host (default: host.docker.internal)",
    )

    config = commands.add_parser("config", help="config files").add_subparsers(metavar="ACTION")
    validate = config.add_parser("validate", help="check a config file; exit 0 if valid, 2 if not")
    validate.add_argument("file", type=Path)
    validate.add_argument("--json", action="store_true", help="print JSON: valid, and the problems if not")
    validate.set_defaults(run=cmd_config_validate)
    init = config.add_parser("init", help="write a first config for this host, with the detected profile")
    init.add_argument("--profile", default=None, help="profile name (default: the one detected for this host)")
    init.add_argument("--state-dir", default="/var/lib/localllm", help="daemon state directory")
    init.add_argument("-o", "--output", type=Path, help="file to write (default: print it)")
    init.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    init.set_defaults(run=cmd_config_init)

    profiles = commands.add_parser("profiles", help="hardware profiles").add_subparsers(metavar="ACTION")
    for name, run, help in (
        ("list", cmd_profiles_list, "the known profiles; the detected one is marked"),
        ("detect", cmd_profiles_detect, "what this host has, and the profile chosen for it"),
    ):
        sub = profiles.add_parser(name, help=help)
        sub.add_argument("--json", action="store_true", help="print JSON instead of text")
        sub.add_argument("--profiles-dir", type=Path, help="extra profiles directory")
        sub.set_defaults(run=run)
    show = profiles.add_parser("show", help="one profile, as YAML")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.add_argument("--profiles-dir", type=Path, help="extra profiles directory")
    show.set_defaults(run=cmd_profiles_show)

    completion = command(
        "completion",
        cmd_completion,
        'print the shell completion script: eval "$(localllmctl completion bash)"',
        daemon=False,
    )
    completion.add_argument("shell", choices=["bash", "zsh", "fish"])

    image = commands.add_parser("image", help="container images").add_subparsers(metavar="ACTION")
    build = image.add_parser("build", help="build the CPU llama-server image from the pinned PyPI sdist")
    build.add_argument("--version", dest="llama_version", default=None, help="llama-cpp-python version to build")
    build.set_defaults(run=cmd_image_build)

    model = commands.add_parser("model", help="model files").add_subparsers(metavar="ACTION")
    generate = model.add_parser(
        "generate", help="write a small random-weight GGUF model (for CPU/offline hosts and tests)"
    )
    generate.add_argument("path", type=Path)
    generate.add_argument("--blocks", type=int, default=2)
    generate.add_argument("--embedding", type=int, default=64)
    generate.add_argument("--context", type=int, default=2048)
    generate.add_argument(
        "--tied-embeddings",
        action="store_true",
        help="no output.weight: the head is the token embedding, as in Gemma or Llama 3.2 1B",
    )
    generate.add_argument(
        "--fim",
        action="store_true",
        help="name three of its words its fill-in-the-middle tokens, so llama-server serves /infill with it",
    )
    generate.add_argument(
        "--kind",
        choices=["chat", "reranker", "tools"],  # tinygguf.KINDS, not imported: it needs numpy
        default="chat",
        help="chat: a plain llama model (the default); reranker: a qwen3 rank-pooling model with a "
        "classification head, for llama-server --reranking (/v1/rerank); tools: a llama model with a "
        "tool-calling chat template that makes one well-formed call when a call is required",
    )
    generate.add_argument("--seed", type=int, default=0, help="of the random weights (default 0)")
    generate.set_defaults(run=cmd_model_generate)
    return parser


# -- commands that work on files and this host ----------------------------------------


def cmd_estimate(args: argparse.Namespace) -> int:
    from supervisor.fleet.sizing import size_model
    from supervisor.runtime.hardware import select_profile

    entry, profile_name, profiles_dir = estimate_target(args)
    if entry.backend == "ollama":  # no file here: the daemon asks Ollama, or knows what it learned
        memory = asyncio.run(client(args).get(f"/models/{quote(entry.name)}/memory"))
        print(json.dumps(memory, indent=2) if args.json else render_ollama_memory(memory))
        return EXIT_OK
    profile, _ = select_profile(args.profile or profile_name, profiles_dir)
    if args.parallel:
        defaults = profile.defaults.model_copy(update={"parallel": args.parallel})
        profile = profile.model_copy(update={"defaults": defaults})
    changes = {
        "context_size": args.context,
        "gpu_layers": args.gpu_layers,
        "cache_type_k": args.cache_type,
        "cache_type_v": args.cache_type,
        "flash_attention": None if args.flash_attn is None else args.flash_attn == "on",
    }
    entry = entry.model_copy(update={k: v for k, v in changes.items() if v is not None})
    sizing = size_model(entry, profile)
    if sizing.estimate is None:
        raise BadRequest(f"cannot estimate {entry.gguf}: {sizing.problem}")
    if args.json:
        print(
            json.dumps(
                {
                    "model": entry.name,
                    "file": str(entry.gguf),
                    "profile": profile.name,
                    "launch": dataclasses.asdict(sizing.launch),
                    **sizing.estimate.as_dict(),
                },
                indent=2,
            )
        )
    else:
        print(render_estimate(entry.name, str(entry.gguf), profile.name, sizing))
    return EXIT_OK


def estimate_target(args: argparse.Namespace):
    """The catalog entry (or a bare file's stand-in entry), its profile name and profiles directory."""
    from supervisor.config.settings import ModelEntry

    if args.config:
        config = load_config(args.config, check_files=False)
        entry = config.model_named(args.model)
        if entry is not None:
            return entry, config.profile, config.profiles_dir
    path = Path(args.model)
    if path.is_file():
        return ModelEntry(name=path.stem, gguf=path.resolve()), "cpu-only", None
    where = f"the catalog of {args.config}" if args.config else "the catalog (give --config FILE)"
    raise BadRequest(f"'{args.model}' is neither a model in {where} nor a GGUF file")


def cmd_librechat(args: argparse.Namespace) -> int:
    import yaml

    from supervisor.cli.librechat import librechat_block

    if not args.config:
        raise BadRequest("librechat needs --config FILE: the catalog, the proxy port and the API key come from it")
    block = librechat_block(load_config(args.config, check_files=False), args.name, args.host)
    print(yaml.safe_dump(block, sort_keys=False).rstrip())
    return EXIT_OK


def cmd_config_validate(args: argparse.Namespace) -> int:
    from supervisor.core.errors import ConfigError

    try:
        config = load_config(args.file)
    except ConfigError as exc:
        if not args.json:
            raise
        print(json.dumps({"file": str(args.file), "valid": False, "problems": exc.problems}, indent=2))
        return exc.exit_code
    if args.json:
        print(
            json.dumps(
                {
                    "file": str(args.file),
                    "valid": True,
                    "models": [m.name for m in config.models],
                    "profile": config.profile,
                },
                indent=2,
            )
        )
    else:
        print(f"{args.file}: valid ({len(config.models)} models, profile {config.profile})")
    return EXIT_OK


def cmd_config_init(args: argparse.Namespace) -> int:
    from supervisor.cli.initconfig import initial_config
    from supervisor.config.profiles import closest_profile, load_profiles
    from supervisor.runtime.hardware import detect_host

    profiles = load_profiles()
    if args.profile is None:
        profile, reason = closest_profile(detect_host(), profiles)
    elif args.profile in profiles:
        profile, reason = profiles[args.profile], "chosen with --profile"
    else:
        raise BadRequest(f"unknown profile '{args.profile}' (known: {', '.join(sorted(profiles))})")
    target = str(args.output or DEFAULT_CONFIG)
    text = initial_config(profile.name, reason, target, args.state_dir)
    if args.output is None:
        print(text, end="")
        return EXIT_OK
    if args.output.exists() and not args.force:
        raise BadRequest(f"{args.output} exists; keeping it (use --force to overwrite)")
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    except OSError as exc:
        raise BadRequest(f"cannot write {args.output}: {exc.strerror or exc}") from None
    print(f"wrote {args.output} (profile {profile.name}: {reason})")
    return EXIT_OK


def cmd_profiles_list(args: argparse.Namespace) -> int:
    from supervisor.config.profiles import closest_profile, load_profiles
    from supervisor.runtime.hardware import detect_host

    profiles = load_profiles(args.profiles_dir)
    detected, _ = closest_profile(detect_host(), profiles)
    rows = [p.model_dump(mode="json") for p in profiles.values()]
    if args.json:
        print(json.dumps({"detected": detected.name, "profiles": rows}, indent=2))
    else:
        print(render_profiles(rows, detected.name))
    return EXIT_OK


def cmd_profiles_show(args: argparse.Namespace) -> int:
    import yaml

    from supervisor.config.profiles import load_profiles

    profiles = load_profiles(args.profiles_dir)
    if args.name not in profiles:
        raise BadRequest(f"unknown profile '{args.name}' (known: {', '.join(sorted(profiles))})")
    data = profiles[args.name].model_dump(mode="json")
    print(json.dumps(data, indent=2) if args.json else yaml.safe_dump(data, sort_keys=False).rstrip())
    return EXIT_OK


def cmd_profiles_detect(args: argparse.Namespace) -> int:
    from supervisor.config.profiles import closest_profile, load_profiles
    from supervisor.runtime.hardware import detect_host

    host = detect_host()
    profile, reason = closest_profile(host, load_profiles(args.profiles_dir))
    if args.json:
        print(json.dumps({"host": dataclasses.asdict(host), "profile": profile.name, "reason": reason}, indent=2))
    else:
        print(f"host: {host.describe()}\nprofile: {profile.name}\nreason: {reason}")
    return EXIT_OK


def cmd_completion(args: argparse.Namespace) -> int:
    import argcomplete

    print(argcomplete.shellcode(["localllmctl"], shell=args.shell))
    return EXIT_OK


def cmd_image_build(args: argparse.Namespace) -> int:
    from supervisor.runtime.docker_runtime import DockerRuntime
    from supervisor.runtime.images import LLAMA_CPP_PYTHON_VERSION, build_cpu_image

    async def build() -> str:
        runtime = DockerRuntime()
        try:
            await runtime.connect()
            return await build_cpu_image(
                runtime, args.llama_version or LLAMA_CPP_PYTHON_VERSION, lambda line: print(f"==> {line}", flush=True)
            )
        finally:
            await runtime.close()

    asyncio.run(build())
    return EXIT_OK


def cmd_model_generate(args: argparse.Namespace) -> int:
    from supervisor.runtime.tinygguf import write_tiny_model

    try:
        path = write_tiny_model(
            args.path,
            blocks=args.blocks,
            embedding=args.embedding,
            context=args.context,
            tied_embeddings=args.tied_embeddings,
            name=args.path.stem,
            kind=args.kind,
            seed=args.seed,
            fim=args.fim,
        )
    except ValueError as exc:
        print(f"localllmctl: model generate: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return EXIT_OK


# -- shell completion --------------------------------------------------------------


def _complete_models(prefix: str, parsed_args: argparse.Namespace, **_) -> list[str]:
    """Model names for shell completion, asked of the running daemon; nothing if it does not answer."""
    try:
        models = asyncio.run(ControlClient(target(parsed_args), COMPLETION_TIMEOUT).get("/models"))["models"]
    except Exception:
        return []
    return [name for m in models for name in [m["name"], *m["aliases"]] if name.startswith(prefix)]


def _enable_completion(parser: argparse.ArgumentParser) -> None:
    if "_ARGCOMPLETE" in os.environ:  # only when the shell asks: keeps the import off every run
        import argcomplete

        argcomplete.autocomplete(parser)
