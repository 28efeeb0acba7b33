"""localllmctl, the operator's CLI.

Exit statuses (also in the README): 0 success, 1 failure, 2 bad input
(arguments, config), 3 the daemon or the Docker engine is unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import aiohttp

from . import __version__
from .config import load_config
from .errors import EXIT_BAD_INPUT, EXIT_OK, ControlUnreachable, LocalllmError

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

    config = commands.add_parser("config", help="config file commands").add_subparsers(metavar="ACTION")
    validate = config.add_parser("validate", help="check a config file; exit 0 if valid, 2 if not")
    validate.add_argument("file", type=Path)
    validate.set_defaults(run=cmd_config_validate)

    image = commands.add_parser("image", help="container images").add_subparsers(metavar="ACTION")
    build = image.add_parser("build", help="build the CPU llama-server image from the pinned PyPI sdist")
    build.add_argument("--version", dest="llama_version", default=None, help="llama-cpp-python version to build")
    build.set_defaults(run=cmd_image_build)

    model = commands.add_parser("model", help="model files").add_subparsers(metavar="ACTION")
    generate = model.add_parser("generate", help="write a small random-weight GGUF model (for CPU/offline hosts and tests)")
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
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session:
            async with session.get(f"http://localllmd{route}", timeout=aiohttp.ClientTimeout(total=30)) as response:
                body = await response.json(content_type=None)
                if response.status >= 400:
                    message = body.get("error", {}).get("message", f"HTTP {response.status}")
                    raise LocalllmError(message)
                return body
    except (aiohttp.ClientConnectionError, FileNotFoundError, PermissionError) as exc:
        raise ControlUnreachable(f"localllmd is not reachable on {path}: {exc}") from None


# -- rendering -----------------------------------------------------------------


def render_status(status: dict) -> str:
    daemon = status["daemon"]
    head = (f"localllmd {daemon['version']}  instance {daemon['instance']}  profile {daemon['profile']}  "
            f"up {format_age(daemon['uptime_seconds'])}  docker {daemon['docker_version']}\n"
            f"proxy {', '.join(daemon['proxy'])}\n")
    rows = [["MODEL", "STATE", "PORT", "CONTAINER", "IN-FLIGHT", "LAST USED", "FLAGS"]]
    now = time.time()
    for model in status["models"]:
        flags = ",".join(f for f in ("preload", "pinned") if model[f])
        last = format_age(now - model["last_used"]) + " ago" if model["last_used"] else "-"
        rows.append([model["name"], model["state"], str(model["port"] or "-"), model["container"] or "-",
                     str(model["in_flight"]), last, flags or "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
    errors = [f"  {m['name']}: {m['error']}" for m in status["models"] if m.get("error")]
    return head + "\n" + table + ("\n\nerrors:\n" + "\n".join(errors) if errors else "")


def format_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
