"""systemd's notify protocol on a real datagram socket, and the watchdog pinged from the event loop."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from supervisor.daemon import syslog_priority
from supervisor.runtime.sdnotify import Notifier, ping_watchdog, watchdog_interval

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def listener(tmp_path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "notify.sock"))
    server.settimeout(2)
    yield server, str(tmp_path / "notify.sock")
    server.close()


def test_ready_status_and_stopping_arrive_as_datagrams(listener):
    server, path = listener
    notifier = Notifier(path)
    notifier.ready("2 ready")
    assert server.recv(4096) == b"READY=1\nSTATUS=2 ready"
    notifier.status("2 ready")  # unchanged: not sent again
    notifier.status("1 ready, 1 starting")
    assert server.recv(4096) == b"STATUS=1 ready, 1 starting"
    notifier.stopping()
    assert server.recv(4096).startswith(b"STOPPING=1\n")
    notifier.close()


def test_an_abstract_socket_address_starts_with_at():
    name = f"localllm-test-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(2)
        notifier = Notifier("@" + name)
        assert notifier.send("WATCHDOG=1")
        assert server.recv(64) == b"WATCHDOG=1"
        notifier.close()


def test_without_notify_socket_nothing_is_sent():
    assert Notifier(None).send("READY=1") is False


@pytest.mark.parametrize(
    "environ, pid, expected",
    [
        ({}, 1, None),
        ({"WATCHDOG_USEC": "30000000"}, 1, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, 1, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "2"}, 1, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, 1, None),
        ({"WATCHDOG_USEC": "soon"}, 1, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(environ, pid, expected):
    assert watchdog_interval(environ, pid) == expected


def test_watchdog_pings_stop_while_the_event_loop_is_blocked(listener):
    server, path = listener
    arrivals: list[float] = []
    stop = threading.Event()

    def receive() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                if server.recv(64) == b"WATCHDOG=1":
                    arrivals.append(time.monotonic())
            except TimeoutError:
                pass

    async def scenario() -> tuple[float, float]:
        notifier = Notifier(path)
        pinger = asyncio.create_task(ping_watchdog(notifier, 0.02))
        await asyncio.sleep(0.3)
        blocked_from = time.monotonic()
        time.sleep(0.6)  # the loop is wedged: no task runs
        blocked_until = time.monotonic()
        await asyncio.sleep(0.3)
        pinger.cancel()
        notifier.close()
        return blocked_from, blocked_until

    thread = threading.Thread(target=receive)
    thread.start()
    blocked_from, blocked_until = asyncio.run(scenario())
    stop.set()
    thread.join()
    during = [t for t in arrivals if blocked_from + 0.05 < t < blocked_until - 0.01]
    assert len([t for t in arrivals if t < blocked_from]) >= 5  # it was pinging before...
    assert during == []  # ...not while the loop was blocked...
    assert len([t for t in arrivals if t > blocked_until]) >= 5  # ...and again afterwards


@pytest.mark.parametrize("level, priority", [(5, 7), (10, 7), (20, 6), (25, 5), (30, 4), (40, 3), (50, 2)])
def test_loguru_levels_map_to_syslog_priorities(level, priority):
    assert syslog_priority(level) == priority


def test_the_unit_file_passes_systemd_analyze_verify(tmp_path):
    # The unit as shipped, with ExecStart pointed at this checkout's localllmd (the installed path does not
    # exist here); verify prints a line for each bad directive and still exits 0, so stderr must be empty.
    import sys

    unit = (ROOT / "systemd" / "localllm.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit
    local = str(Path(sys.executable).parent / "localllmd")
    (tmp_path / "localllm.service").write_text(unit.replace("/opt/localllm/venv/bin/localllmd", local))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "localllm.service")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
