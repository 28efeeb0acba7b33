"""systemd's notify protocol: READY, STATUS, WATCHDOG and STOPPING datagrams to ``$NOTIFY_SOCKET``.

Dependency-free, after systemd's own ``notify-selfcontained-example``: one
``AF_UNIX`` datagram per message, an ``@`` address meaning the abstract
namespace. Without ``$NOTIFY_SOCKET`` (not run by systemd) every call is a
no-op. The watchdog is pinged from a task on the event loop itself, so a
wedged loop stops the pings and systemd restarts the daemon.
"""

from __future__ import annotations

import asyncio
import os
import socket


class Notifier:
    def __init__(self, address: str | None):
        self.address = address
        self._socket: socket.socket | None = None
        if address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._last_status: str | None = None

    @classmethod
    def from_environment(cls) -> Notifier:
        return cls(os.environ.get("NOTIFY_SOCKET"))

    def send(self, *fields: str) -> bool:
        """Send one datagram of ``KEY=value`` lines; False when there is nobody to tell or it failed."""
        if self._socket is None or not self.address:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            self._socket.sendto("\n".join(fields).encode(), target)
            return True
        except OSError:
            return False

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        """STATUS= only when the text changed: systemctl status shows the latest line."""
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: finishing requests, then removing containers")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: dict[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between pings (half of ``$WATCHDOG_USEC``), or None when no watchdog is asked of this process."""
    environ = os.environ if environ is None else environ
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 2 / 1_000_000


async def ping_watchdog(notifier: Notifier, interval: float) -> None:
    """Runs on the event loop for the daemon's life: a blocked loop means no pings."""
    while True:
        notifier.send("WATCHDOG=1")
        await asyncio.sleep(interval)
