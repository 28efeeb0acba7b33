"""Whose is the listener on a loopback port: the check before a TCP-hosted server gets its first request.

A server that must use TCP (Ollama: no UNIX sockets, no API key) binds
127.0.0.1:<port> on the host network. A local program that binds the port
first makes the server exit, and would answer our health checks and receive
every prompt in its place. So no request, not even a health probe, goes to the
port until the socket listening on it is known to be the container's: its
inode (``/proc/net/tcp``) is held by a process in the container's cgroup.
Where the holders cannot be read (another user's processes, for a daemon that
is not root), the socket's owner must be the user the server runs as.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .cgroups import container_of

LISTEN = "0A"  # the TCP state in /proc/net/tcp


@dataclass(frozen=True)
class Listener:
    inode: int
    uid: int


def listeners_on(port: int, tables: list[str]) -> list[Listener]:
    """The listening sockets on ``port`` (any address) in the text of /proc/net/tcp and tcp6 tables."""
    found = []
    for table in tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 10 or fields[3] != LISTEN:
                continue
            _, _, port_hex = fields[1].rpartition(":")
            if int(port_hex, 16) == port:
                found.append(Listener(inode=int(fields[9]), uid=int(fields[7])))
    return found


def read_listeners(port: int, proc: Path = Path("/proc")) -> list[Listener]:
    tables = []
    for name in ("tcp", "tcp6"):
        try:
            tables.append((proc / "net" / name).read_text())
        except OSError:
            continue
    return listeners_on(port, tables)


def holders(inode: int, proc: Path = Path("/proc")) -> list[int]:
    """The PIDs holding socket ``inode`` among the processes whose descriptors we may read."""
    target, pids = f"socket:[{inode}]", []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:  # gone, or another user's
            continue
        if target in links:
            pids.append(int(entry.name))
    return pids


def claim(port: int, container_id: str, server_uid: int, proc: Path = Path("/proc")) -> tuple[bool, str | None]:
    """(whether anything listens on ``port``, why a listener there is not the container's or None)."""
    found = read_listeners(port, proc)
    for listener in found:
        pids = holders(listener.inode, proc)
        if pids:
            if any(container_of(pid, proc) == container_id for pid in pids):
                continue
            return True, f"port {port} is held by another program (pid {', '.join(map(str, pids))})"
        if listener.uid != server_uid:
            return True, f"port {port} is held by a socket of uid {listener.uid}, not of the server's ({server_uid})"
    return bool(found), None
