"""Where localllmctl finds the daemon: the most capable control socket this user may open, or a TCP URL.

Each role has a socket (access.py): the admin one (``/var/lib/localllm/control.sock``
unless the config says otherwise) and, beside it, ``control-operator.sock`` and
``control-viewer.sock``. Without ``--socket`` or ``--url``, localllmctl takes the first of
admin, operator and viewer whose socket exists and that it may open (``--role`` picks one),
so a member of the viewers' group runs ``localllmctl status`` with no flags at all.

How long localllmctl waits for the daemon is ``--timeout`` (ctl_client.py says what the deadline covers).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from supervisor.cli.client import DEFAULT_TIMEOUT, ControlClient, Target
from supervisor.config.access import Role, role_socket_path, socket_paths
from supervisor.config.settings import load_config

DEFAULT_SOCKET = Path("/var/lib/localllm/control.sock")
CHECK_TIMEOUT = 5.0  # status --check: a monitoring check must answer soon
TIMEOUT_HELP = (
    f"seconds to wait for the daemon's answer (default {DEFAULT_TIMEOUT:g}, {CHECK_TIMEOUT:g} for "
    "status --check; 0: no limit); a stream (logs, events) or a long action (load, unload, apply, "
    "rollback) must start within it, and then runs as long as it takes"
)


def add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        type=Path,
        help="this control socket and no other (default: $LOCALLLM_SOCKET, or the most capable one "
        f"you may open of {DEFAULT_SOCKET} (admin), control-operator.sock and "
        "control-viewer.sock beside it, or those of --config)",
    )
    parser.add_argument(
        "--role",
        choices=[str(role) for role in Role],
        help="use the socket of this role (default: the most capable one you may open)",
    )
    parser.add_argument(
        "--url",
        help="TCP control API, e.g. https://host:8443 or http://127.0.0.1:8090 (default: "
        "$LOCALLLM_URL); the token comes from $LOCALLLM_TOKEN",
    )
    parser.add_argument(
        "--cacert",
        type=Path,
        help="with an https --url: the CA certificate (PEM) that signed the daemon's certificate, "
        "or that certificate itself (default: $LOCALLLM_CACERT, or the system's CAs)",
    )
    parser.add_argument("--timeout", type=seconds, metavar="SECONDS", help=TIMEOUT_HELP)


def add_timeout_option(parser: argparse.ArgumentParser) -> None:
    """``--timeout`` after the command too (``status --check --timeout 2``); it wins over one before it."""
    parser.add_argument("--timeout", type=seconds, metavar="SECONDS", default=argparse.SUPPRESS, help=TIMEOUT_HELP)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more (0: no limit), not '{text}'")
    return value


def deadline(args: argparse.Namespace) -> float | None:
    """``--timeout``, or the default for the command; None: no limit."""
    chosen = getattr(args, "timeout", None)
    if chosen is None:
        chosen = CHECK_TIMEOUT if getattr(args, "check", False) else DEFAULT_TIMEOUT
    return chosen or None


def target(args: argparse.Namespace) -> Target:
    needs_config = args.config and not (
        args.url or args.socket or os.environ.get("LOCALLLM_URL") or os.environ.get("LOCALLLM_SOCKET")
    )
    return find_target(args, load_config(args.config, check_files=False).daemon if needs_config else None)


def client(args: argparse.Namespace) -> ControlClient:
    return ControlClient(target(args), deadline(args))


def find_target(args: argparse.Namespace, config_daemon=None) -> Target:
    """``config_daemon``: the daemon settings of ``--config``, when given (they name the sockets)."""
    url = args.url or os.environ.get("LOCALLLM_URL")
    if url:
        cacert = args.cacert or (Path(os.environ["LOCALLLM_CACERT"]) if os.environ.get("LOCALLLM_CACERT") else None)
        return Target(url=url, token=os.environ.get("LOCALLLM_TOKEN"), cacert=cacert)
    role = Role(args.role) if args.role else None
    exact = args.socket or os.environ.get("LOCALLLM_SOCKET")
    if exact and role is None:
        return Target(socket=Path(exact))
    if exact:  # --role with a named socket: that socket is the admin one, the others are beside it
        paths = {r: role_socket_path(Path(exact), r) for r in Role} | {Role.ADMIN: Path(exact)}
    elif config_daemon is not None:
        paths = {r: role_socket_path(config_daemon.socket_path, r) for r in Role} | socket_paths(config_daemon)
    else:
        paths = {r: role_socket_path(DEFAULT_SOCKET, r) for r in Role} | {Role.ADMIN: DEFAULT_SOCKET}
    return choose_socket(paths, role)


def choose_socket(paths: dict[Role, Path], role: Role | None = None) -> Target:
    """The socket of ``role``, or the most capable one that exists and this user may open."""
    if role is not None:
        return Target(socket=paths[role], role=role)
    for candidate in (Role.ADMIN, Role.OPERATOR, Role.VIEWER):
        path = paths[candidate]
        if path.exists() and os.access(path, os.R_OK | os.W_OK):
            return Target(socket=path, role=candidate)
    return Target(socket=paths[Role.ADMIN], role=Role.ADMIN)  # connecting says why not
