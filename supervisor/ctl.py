"""localllmctl, the operator's CLI.

Exit statuses (also in the README): 0 success, 1 failure, 2 bad input
(arguments, config), 3 the daemon or the Docker engine is unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import aiohttp

from . import __version__
from .config import load_config
from .errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_OK,
    BadRequest,
    ControlUnreachable,
    LocalllmError,
)
from .estimate import CACHE_TYPE_BYTES

DEFAULT_SOCKET = Path("/var/lib/localllm/control.sock")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return args.run(args)
    except LocalllmError as exc:
        print(f"localllmctl: {exc.message}", file=sys.stderr)
        return exc.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localllmctl", description="Operate localllmd.")
    parser.add_argument("--version", action="version", version=f"localllmctl {__version__}")
    parser.add_argument("--socket", type=Path, help="control socket (default: $LOCALLLM_SOCKET or the config's)")
    parser.add_argument("--config", type=Path, help="daemon config file, to find its control socket")
    commands = parser.add_subparsers(metavar="COMMAND")

    status = commands.add_parser("status", aliases=["ps"], help="the daemon and its models")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(run=cmd_status)

    estimate = commands.add_parser("estimate", help="the memory a model needs, part by part")
    estimate.add_argument("model", help="a catalog model (name or alias, with --config) or a GGUF file")
    estimate.add_argument("--profile", help="profile to size for (default: the config's; cpu-only for a bare file)")
    estimate.add_argument("--context", type=int, help="context size (default: the catalog's or the profile's)")
    estimate.add_argument("--parallel", type=int, help="parallel slots (default: the profile's)")
    estimate.add_argument("--gpu-layers", type=int, help="layers to offload (-1: all)")
    estimate.add_argument("--cache-type", choices=sorted(CACHE_TYPE_BYTES), help="KV cache type for K and V")
    estimate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    estimate.set_defaults(run=cmd_estimate)

    apply = commands.add_parser("apply", help="apply a config file to the running daemon (health-gated, "
                                                  "reverted on failure)")
    apply.add_argument("file", type=Path)
    apply.add_argument("--json", action="store_true", help="print the report as JSON")
    apply.set_defaults(run=cmd_apply)

    history = commands.add_parser("history", help="the config generations, newest last")
    history.add_argument("--json", action="store_true", help="print JSON instead of a table")
    history.set_defaults(run=cmd_history)

    rollback = commands.add_parser("rollback", help="apply an earlier generation again (default: the last "
                                                        "good one before the active one)")
    rollback.add_argument("generation", type=int, nargs="?")
    rollback.add_argument("--json", action="store_true", help="print the report as JSON")
    rollback.set_defaults(run=cmd_rollback)

    librechat = commands.add_parser("librechat", help="print a librechat.yaml endpoints block for this daemon "
                                                          "(needs --config)")
    librechat.add_argument("--name", default="localllm", help="endpoint name (must not start with 'ollama')")
    librechat.add_argument("--host", default="host.docker.internal",
                           help="how LibreChat's container reaches this host (default: host.docker.internal)")
    librechat.set_defaults(run=cmd_librechat)

    config = commands.add_parser("config", help="config file commands").add_subparsers(metavar="ACTION")
    validate = config.add_parser("validate", help="check a config file; exit 0 if valid, 2 if not")
    validate.add_argument("file", type=Path)
    validate.set_defaults(run=cmd_config_validate)

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
    generate.set_defaults(run=cmd_model_generate)
    return parser


# -- commands --------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    status = asyncio.run(control_get(socket_path(args), "/status"))
    print(json.dumps(status, indent=2) if args.json else render_status(status))
    return EXIT_OK


def cmd_estimate(args: argparse.Namespace) -> int:
    from .hardware import select_profile
    from .sizing import size_model

    entry, profile_name, profiles_dir = estimate_target(args)
    profile, _ = select_profile(args.profile or profile_name, profiles_dir)
    if args.parallel:
        defaults = profile.defaults.model_copy(update={"parallel": args.parallel})
        profile = profile.model_copy(update={"defaults": defaults})
    changes = {"context_size": args.context, "gpu_layers": args.gpu_layers,
               "cache_type_k": args.cache_type, "cache_type_v": args.cache_type}
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


def cmd_apply(args: argparse.Namespace) -> int:
    """The daemon validates (file and line in its answer) and records even an invalid config as a generation."""
    try:
        text = args.file.read_text()
    except OSError as exc:
        raise BadRequest(f"cannot read {args.file}: {exc.strerror or exc}") from None
    body = {"config": text, "source": str(args.file.resolve())}
    print_report(asyncio.run(control_request(socket_path(args), "POST", "/apply", body)), args.json)
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    report = asyncio.run(control_request(socket_path(args), "POST", "/rollback", {"generation": args.generation}))
    print_report(report, args.json)
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    generations = asyncio.run(control_get(socket_path(args), "/history"))["generations"]
    if args.json:
        print(json.dumps(generations, indent=2))
        return EXIT_OK
    rows = [["GEN", "STATUS", "WHEN", "SOURCE", "REASON"]]
    for g in generations:
        marks = "".join(m for m, on in ((" *active", g["active"]), (" *last-good", g["last_good"])) if on)
        rows.append([str(g["number"]), g["status"] + marks, time.strftime("%Y-%m-%d %H:%M:%S",
                     time.localtime(g["created_at"])), g["source"], g["reason"] or "-"])
    print(render_table(rows))
    return EXIT_OK


def print_report(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    plan = report["plan"]
    for label in ("replace", "remove", "add", "keep"):
        if plan[label]:
            print(f"  {label:<8} {', '.join(plan[label])}")
    print(f"generation {report['generation']} ({report['source']}): {report['status']}")


def cmd_librechat(args: argparse.Namespace) -> int:
    import yaml

    from .librechat import librechat_block

    if not args.config:
        raise BadRequest("librechat needs --config FILE: the catalog, the proxy port and the API key come from it")
    block = librechat_block(load_config(args.config, check_files=False), args.name, args.host)
    print(yaml.safe_dump(block, sort_keys=False).rstrip())
    return EXIT_OK


def cmd_config_validate(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    print(f"{args.file}: valid ({len(config.models)} models, profile {config.profile})")
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
                                name=args.path.stem)
    except ValueError as exc:
        print(f"localllmctl: model generate: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return EXIT_OK


# -- talking to the daemon ----------------------------------------------------


def socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return args.socket
    if os.environ.get("LOCALLLM_SOCKET"):
        return Path(os.environ["LOCALLLM_SOCKET"])
    if args.config:
        return load_config(args.config, check_files=False).daemon.socket_path
    return DEFAULT_SOCKET


async def control_get(path: Path, route: str) -> dict:
    return await control_request(path, "GET", route)


async def control_request(path: Path, method: str, route: str, body: dict | None = None) -> dict:
    """One call to the control API; an error answer becomes a RemoteError with its code."""
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session:
            async with session.request(method, f"http://localllmd{route}", json=body,
                                       timeout=aiohttp.ClientTimeout(total=3600)) as response:
                answer = await response.json(content_type=None)
                if response.status >= 400:
                    error = answer.get("error", {})
                    raise RemoteError(error.get("message", f"HTTP {response.status}"), error.get("code", ""))
                return answer
    except (aiohttp.ClientConnectionError, FileNotFoundError, PermissionError) as exc:
        raise ControlUnreachable(f"localllmd is not reachable on {path}: {exc}") from None


class RemoteError(LocalllmError):
    """An error the daemon answered with; bad input on our side exits 2, anything else 1."""

    BAD_INPUT = {"invalid_config", "bad_request", "apply_refused", "model_not_found"}

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code
        self.exit_code = EXIT_BAD_INPUT if code in self.BAD_INPUT else EXIT_FAILURE


# -- rendering -----------------------------------------------------------------


def render_status(status: dict) -> str:
    daemon = status["daemon"]
    head = (f"localllmd {daemon['version']}  instance {daemon['instance']}  profile {daemon['profile']}  "
            f"up {format_age(daemon['uptime_seconds'])}  docker {daemon['docker_version']}\n"
            f"proxy {', '.join(daemon['proxy'])}\n")
    rows = [["MODEL", "STATE", "DEVICE", "MEMORY", "PORT", "CONTAINER", "IN-FLIGHT", "WAITING", "LAST USED", "FLAGS"]]
    now = time.time()
    for model in status["models"]:
        flags = ",".join(f for f in ("preload", "pinned") if model[f])
        last = format_age(now - model["last_used"]) + " ago" if model["last_used"] else "-"
        memory = model.get("memory") or {}
        rows.append([model["name"], model["state"], model.get("device") or "-", format_mib(memory.get("need")),
                     str(model["port"] or "-"), model["container"] or "-", str(model["in_flight"]),
                     str(model.get("waiting", 0)), last, flags or "-"])
    errors = [f"  {m['name']}: {m['error']}" for m in status["models"] if m.get("error")]
    if daemon.get("degraded"):
        head += f"DEGRADED: {daemon['degraded']}\n"
    return head + "\n" + render_table(rows) + ("\n\nerrors:\n" + "\n".join(errors) if errors else "")


def render_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def render_estimate(name: str, path: str, profile: str, sizing) -> str:
    launch, parts = sizing.launch, sizing.estimate
    where = (f"{parts.offloaded_layers}/{parts.total_layers} layers on the GPU" if launch.on_gpu
             else "all layers in host memory")
    head = (f"{name} ({path})\nprofile {profile}: context {launch.context}, {launch.parallel} slot(s), "
            f"KV cache {launch.cache_type_k}/{launch.cache_type_v}, {where}\n")
    rows = [("weights", parts.weights), ("KV cache", parts.kv_cache), ("compute", parts.compute),
            ("overhead", parts.overhead), ("total", parts.total)]
    return head + "\n".join(f"  {label:<9} {value / 2**20:>10.1f} MiB" for label, value in rows)


def format_mib(value: int | None) -> str:
    """Bytes, short: ``1.5M``, ``118M``, ``5.4G``."""
    if value is None:
        return "-"
    mib = value / 2**20
    return f"{mib:.1f}M" if mib < 10 else f"{mib:.0f}M" if mib < 1024 else f"{mib / 1024:.1f}G"


def format_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
