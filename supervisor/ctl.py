"""localllmctl, the operator's CLI.

Exit statuses (also in the README): 0 success, 1 failure (and ``status --check``
finding the daemon unhealthy), 2 bad input (arguments, config), 3 the daemon or
the Docker engine is unreachable.
"""

# PYTHON_ARGCOMPLETE_OK
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from urllib.parse import quote as _quote

from . import __version__
from .config import load_config
from .ctl_client import ControlClient, RemoteError, Target
from .ctl_render import (
    endpoint_phrase,
    render_estimate,
    render_event,
    render_history,
    render_ollama_memory,
    render_profiles,
    render_report,
    render_status,
)
from .ctl_target import add_target_options, find_target
from .errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, BadRequest, LocalllmError
from .estimate import CACHE_TYPE_BYTES

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
    parser = argparse.ArgumentParser(prog="localllmctl", description="Operate localllmd.",
                                     epilog="exit status: 0 ok, 1 failed, 2 bad input, 3 daemon or Docker unreachable")
    parser.add_argument("--version", action="version", version=f"localllmctl {__version__}")
    add_target_options(parser)
    parser.add_argument("--config", type=Path, help="daemon config file: finds the control socket, the catalog")
    commands = parser.add_subparsers(metavar="COMMAND")

    def command(name: str, run, help: str, json_flag: bool = False, **kwargs) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, **kwargs)
        sub.set_defaults(run=run)
        if json_flag:
            sub.add_argument("--json", action="store_true", help="print JSON instead of text")
        return sub

    status = command("status", cmd_status, "the daemon and its models", True, aliases=["ps"])
    status.add_argument("--check", action="store_true",
                        help="exit 0 if the daemon is healthy, 1 if not (or unreachable); for monitoring")

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

    apply = command("apply", cmd_apply, "apply a config file to the running daemon: shows the change, then its "
                                        "progress until it is healthy or rolled back", True)
    apply.add_argument("file", type=Path)
    command("history", cmd_history, "the config generations, newest last", True)
    rollback = command("rollback", cmd_rollback, "apply an earlier generation again (default: the last good one "
                                                 "before the active one)", True)
    rollback.add_argument("generation", type=int, nargs="?")

    estimate = command("estimate", cmd_estimate, "the memory a model needs, part by part", True)
    estimate.add_argument("model", help="a catalog model (name or alias, with --config) or a GGUF file")
    estimate.add_argument("--profile", help="profile to size for (default: the config's; cpu-only for a bare file)")
    estimate.add_argument("--context", type=int, help="context size (default: the catalog's or the profile's)")
    estimate.add_argument("--parallel", type=int, help="parallel slots (default: the profile's)")
    estimate.add_argument("--gpu-layers", type=int, help="layers to offload (-1: all)")
    estimate.add_argument("--cache-type", choices=sorted(CACHE_TYPE_BYTES), help="KV cache type for K and V")
    estimate.add_argument("--flash-attn", choices=["on", "off"], help="flash attention (default: the catalog's, on)")

    librechat = command("librechat", cmd_librechat, "print a librechat.yaml endpoints block for this daemon")
    librechat.add_argument("--name", default="localllm", help="endpoint name (must not start with 'ollama')")
    librechat.add_argument("--host", default="host.docker.internal",
                           help="how LibreChat's container reaches this host (default: host.docker.internal)")

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
    for name, run, help in (("list", cmd_profiles_list, "the known profiles; the detected one is marked"),
                            ("detect", cmd_profiles_detect, "what this host has, and the profile chosen for it")):
        sub = profiles.add_parser(name, help=help)
        sub.add_argument("--json", action="store_true", help="print JSON instead of text")
        sub.add_argument("--profiles-dir", type=Path, help="extra profiles directory")
        sub.set_defaults(run=run)
    show = profiles.add_parser("show", help="one profile, as YAML")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.add_argument("--profiles-dir", type=Path, help="extra profiles directory")
    show.set_defaults(run=cmd_profiles_show)

    completion = command("completion", cmd_completion, "print the shell completion script: "
                                                       "eval \"$(localllmctl completion bash)\"")
    completion.add_argument("shell", choices=["bash", "zsh", "fish"])

    image = commands.add_parser("image", help="container images").add_subparsers(metavar="ACTION")
    build = image.add_parser("build", help="build the CPU llama-server image from the pinned PyPI sdist")
    build.add_argument("--version", dest="llama_version", default=None, help="llama-cpp-python version to build")
    build.set_defaults(run=cmd_image_build)

    model = commands.add_parser("model", help="model files").add_subparsers(metavar="ACTION")
    generate = model.add_parser("generate",
                                help="write a small random-weight GGUF model (for CPU/offline hosts and tests)")
    generate.add_argument("path", type=Path)
    generate.add_argument("--blocks", type=int, default=2)
    generate.add_argument("--embedding", type=int, default=64)
    generate.add_argument("--context", type=int, default=2048)
    generate.add_argument("--tied-embeddings", action="store_true",
                          help="no output.weight: the head is the token embedding, as in Gemma or Llama 3.2 1B")
    generate.set_defaults(run=cmd_model_generate)
    return parser


# -- commands that talk to the daemon -----------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    if args.check:
        return check_health(args)
    status = asyncio.run(client(args).get("/status"))
    print(json.dumps(status, indent=2) if args.json else render_status(status))
    return EXIT_OK


def check_health(args: argparse.Namespace) -> int:
    """For monitoring: 0 healthy; 1 unhealthy or unreachable, with the reason on stdout."""
    try:
        health = asyncio.run(client(args).get("/health"))
    except RemoteError as exc:  # 503: the daemon answered, and it is not healthy
        health = exc.body
    except LocalllmError as exc:
        health = {"status": "unreachable", "problems": [exc.message]}
    if args.json:
        print(json.dumps(health, indent=2))
    else:
        print(health.get("status", "unhealthy") + "".join(f"\n  {p}" for p in health.get("problems", [])))
    return EXIT_OK if health.get("status") == "ok" else EXIT_FAILURE


def cmd_load(args: argparse.Namespace) -> int:
    model = asyncio.run(with_progress(args, "POST", f"/models/{quote(args.model)}/load", {"model": args.model}))
    print(json.dumps(model, indent=2) if args.json else
          f"{model['name']} is ready {endpoint_phrase(model)} (container {model['container']}, "
          f"loaded in {model['load_seconds'] or 0:.2f}s)")
    return EXIT_OK


def cmd_unload(args: argparse.Namespace) -> int:
    model = asyncio.run(with_progress(args, "POST", f"/models/{quote(args.model)}/unload", {"model": args.model}))
    print(json.dumps(model, indent=2) if args.json else f"{model['name']} is {model['state']}")
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    """Show what would change, then apply it with progress; the daemon validates and records the generation."""
    try:
        text = args.file.read_text()
    except OSError as exc:
        raise BadRequest(f"cannot read {args.file}: {exc.strerror or exc}") from None
    body = {"config": text, "source": str(args.file.resolve())}
    if not args.json:
        try:
            preview = asyncio.run(client(args).request("POST", "/validate", body))
            print(preview["diff"] or "(the config text is unchanged)", file=sys.stderr)
        except RemoteError as exc:  # invalid or refused: the apply below records it as such, and says why
            if exc.code not in ("invalid_config", "apply_refused"):
                raise
    report = asyncio.run(with_progress(args, "POST", "/apply", body))
    print(json.dumps(report, indent=2) if args.json else render_report(report))
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    report = asyncio.run(with_progress(args, "POST", "/rollback", {"generation": args.generation}))
    print(json.dumps(report, indent=2) if args.json else render_report(report))
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    generations = asyncio.run(client(args).get("/history"))["generations"]
    print(json.dumps(generations, indent=2) if args.json else render_history(generations))
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    if args.tail < 0:
        raise BadRequest(f"--tail must be 0 or more, not {args.tail}")

    async def run() -> None:
        params = {"tail": str(args.tail), "follow": "true" if args.follow else "false"}
        async for line in client(args).lines(f"/models/{quote(args.model)}/logs", params):
            print(line, flush=True)

    asyncio.run(run())
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise BadRequest(f"--limit must be 0 or more, not {args.limit}")

    async def run() -> None:
        params = {"limit": str(args.limit), "follow": "true" if args.follow else "false"}
        if args.model:
            params["model"] = args.model
        async for event in client(args).events(params):
            print(json.dumps(event) if args.json else render_event(event), flush=True)

    asyncio.run(run())
    return EXIT_OK


async def with_progress(args: argparse.Namespace, method: str, route: str, body: dict) -> dict:
    """Make a long request while printing the daemon's events to stderr as they happen (not with --json)."""
    control = client(args)
    if args.json:
        return await control.request(method, route, body)
    subscribed, shown = asyncio.Event(), [0]

    async def show_events() -> None:
        async for event in control.events({"limit": "0", "follow": "true"}, on_open=subscribed.set):
            print(render_event(event), file=sys.stderr, flush=True)
            shown[0] = event["id"]

    watcher = asyncio.create_task(show_events())
    try:
        await asyncio.wait([watcher, asyncio.ensure_future(subscribed.wait())], timeout=5,
                           return_when=asyncio.FIRST_COMPLETED)
        if watcher.done():
            watcher.result()  # the stream could not even open: say why
        try:
            return await control.request(method, route, body)
        finally:  # show the events up to the answer (and its failure) before the answer itself
            with contextlib.suppress(LocalllmError, TimeoutError):
                last = (await control.get("/status"))["daemon"]["last_event_id"]
                async with asyncio.timeout(2):
                    while shown[0] < last and not watcher.done():
                        await asyncio.sleep(0.01)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


# -- commands that work on files and this host ----------------------------------------


def cmd_estimate(args: argparse.Namespace) -> int:
    from .hardware import select_profile
    from .sizing import size_model

    entry, profile_name, profiles_dir = estimate_target(args)
    if entry.backend == "ollama":  # no file here: the daemon asks Ollama, or knows what it learned
        memory = asyncio.run(client(args).get(f"/models/{quote(entry.name)}/memory"))
        print(json.dumps(memory, indent=2) if args.json else render_ollama_memory(memory))
        return EXIT_OK
    profile, _ = select_profile(args.profile or profile_name, profiles_dir)
    if args.parallel:
        defaults = profile.defaults.model_copy(update={"parallel": args.parallel})
        profile = profile.model_copy(update={"defaults": defaults})
    changes = {"context_size": args.context, "gpu_layers": args.gpu_layers,
               "cache_type_k": args.cache_type, "cache_type_v": args.cache_type,
               "flash_attention": None if args.flash_attn is None else args.flash_attn == "on"}
    entry = entry.model_copy(update={k: v for k, v in changes.items() if v is not None})
    sizing = size_model(entry, profile)
    if sizing.estimate is None:
        raise BadRequest(f"cannot estimate {entry.gguf}: {sizing.problem}")
    if args.json:
        print(json.dumps({"model": entry.name, "file": str(entry.gguf), "profile": profile.name,
                          "launch": dataclasses.asdict(sizing.launch), **sizing.estimate.as_dict()}, indent=2))
    else:
        print(render_estimate(entry.name, str(entry.gguf), profile.name, sizing))
    return EXIT_OK


def estimate_target(args: argparse.Namespace):
    """The catalog entry (or a bare file's stand-in entry), its profile name and profiles directory."""
    from .config import ModelEntry

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

    from .librechat import librechat_block

    if not args.config:
        raise BadRequest("librechat needs --config FILE: the catalog, the proxy port and the API key come from it")
    block = librechat_block(load_config(args.config, check_files=False), args.name, args.host)
    print(yaml.safe_dump(block, sort_keys=False).rstrip())
    return EXIT_OK


def cmd_config_validate(args: argparse.Namespace) -> int:
    from .errors import ConfigError

    try:
        config = load_config(args.file)
    except ConfigError as exc:
        if not args.json:
            raise
        print(json.dumps({"file": str(args.file), "valid": False, "problems": exc.problems}, indent=2))
        return exc.exit_code
    if args.json:
        print(json.dumps({"file": str(args.file), "valid": True, "models": [m.name for m in config.models],
                          "profile": config.profile}, indent=2))
    else:
        print(f"{args.file}: valid ({len(config.models)} models, profile {config.profile})")
    return EXIT_OK


def cmd_config_init(args: argparse.Namespace) -> int:
    from .hardware import detect_host
    from .initconfig import initial_config
    from .profiles import closest_profile, load_profiles

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
    from .hardware import detect_host
    from .profiles import closest_profile, load_profiles

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

    from .profiles import load_profiles

    profiles = load_profiles(args.profiles_dir)
    if args.name not in profiles:
        raise BadRequest(f"unknown profile '{args.name}' (known: {', '.join(sorted(profiles))})")
    data = profiles[args.name].model_dump(mode="json")
    print(json.dumps(data, indent=2) if args.json else yaml.safe_dump(data, sort_keys=False).rstrip())
    return EXIT_OK


def cmd_profiles_detect(args: argparse.Namespace) -> int:
    from .hardware import detect_host
    from .profiles import closest_profile, load_profiles

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
    from .docker_runtime import DockerRuntime
    from .images import LLAMA_CPP_PYTHON_VERSION, build_cpu_image

    async def build() -> str:
        runtime = DockerRuntime()
        try:
            await runtime.connect()
            return await build_cpu_image(runtime, args.llama_version or LLAMA_CPP_PYTHON_VERSION,
                                         lambda line: print(f"==> {line}", flush=True))
        finally:
            await runtime.close()

    asyncio.run(build())
    return EXIT_OK


def cmd_model_generate(args: argparse.Namespace) -> int:
    from .tinygguf import write_tiny_model

    try:
        path = write_tiny_model(args.path, blocks=args.blocks, embedding=args.embedding, context=args.context,
                                tied_embeddings=args.tied_embeddings, name=args.path.stem)
    except ValueError as exc:
        print(f"localllmctl: model generate: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return EXIT_OK


# -- where the daemon is ------------------------------------------------------------


def target(args: argparse.Namespace) -> Target:
    needs_config = args.config and not (args.url or args.socket or os.environ.get("LOCALLLM_URL")
                                        or os.environ.get("LOCALLLM_SOCKET"))
    return find_target(args, load_config(args.config, check_files=False).daemon if needs_config else None)


def quote(name: str) -> str:
    """A model name as one path segment (names may hold '/' and ':')."""
    return _quote(name, safe="")


def client(args: argparse.Namespace) -> ControlClient:
    return ControlClient(target(args))


def _complete_models(prefix: str, parsed_args: argparse.Namespace, **_) -> list[str]:
    """Model names for shell completion, asked of the running daemon; nothing if it does not answer."""
    try:
        models = asyncio.run(client(parsed_args).get("/models"))["models"]
    except Exception:
        return []
    return [name for m in models for name in [m["name"], *m["aliases"]] if name.startswith(prefix)]


def _enable_completion(parser: argparse.ArgumentParser) -> None:
    if "_ARGCOMPLETE" in os.environ:  # only when the shell asks: keeps the import off every run
        import argcomplete

        argcomplete.autocomplete(parser)

