"""Where localllmctl finds the daemon: the most capable control socket this user may open, or a TCP URL.

Each role has a socket (access.py): the admin one (``/var/lib/localllm/control.sock``
unless the config says otherwise) and, beside it, ``control-operator.sock`` and
``control-viewer.sock``. Without ``--socket`` or ``--url``, localllmctl takes the first of
admin, operator and viewer whose socket exists and that it may open (``--role`` picks one),
so a member of the viewers' group runs ``localllmctl status`` with no flags at all.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .access import Role, role_socket_path, socket_paths
from .ctl_client import Target

DEFAULT_SOCKET = Path("/var/lib/localllm/control.sock")


def add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path,
                        help="this control socket and no other (default: $LOCALLLM_SOCKET, or the most capable one "
                             f"you may open of {DEFAULT_SOCKET} (admin), control-operator.sock and "
                             "control-viewer.sock beside it, or those of --config)")
    parser.add_argument("--role", choices=[str(role) for role in Role],
                        help="use the socket of this role (default: the most capable one you may open)")
    parser.add_argument("--url", help="TCP control API, e.g. https://host:8443 or http://127.0.0.1:8090 (default: "
                                      "$LOCALLLM_URL); the token comes from $LOCALLLM_TOKEN")
    parser.add_argument("--cacert", type=Path,
                        help="with an https --url: the CA certificate (PEM) that signed the daemon's certificate, "
                             "or that certificate itself (default: $LOCALLLM_CACERT, or the system's CAs)")


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
