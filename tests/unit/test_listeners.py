"""supervisor.listeners: whose is the listener on a port, read from a /proc tree made in the test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supervisor.listeners import Listener, claim, listeners_on

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
CONTAINER = "a" * 64
OTHER = "b" * 64


def row(local: str, state: str, uid: int, inode: int) -> str:
    return f"   0: {local} 00000000:0000 {state} 00000000:00000000 00:00000000 00000000 {uid:5d} 0 {inode} 1 0 100 0 0 10 0\n"


def test_only_listening_sockets_on_the_port_count_on_any_address_and_in_both_tables():
    tcp = HEADER + row("0100007F:6D9C", "0A", 0, 11) + row("0100007F:6D9C", "01", 0, 12) + row("0100007F:6D9D", "0A", 0, 13)
    tcp6 = HEADER + row("00000000000000000000000000000000:6D9C", "0A", 65534, 14)
    assert listeners_on(0x6D9C, [tcp, tcp6]) == [Listener(11, 0), Listener(14, 65534)]
    assert listeners_on(1, [tcp, tcp6]) == []
    assert listeners_on(0x6D9C, [HEADER + "garbage\n"]) == []


def fake_proc(tmp_path: Path, listener_uid: int, holders: dict[int, str | None]) -> Path:
    """A /proc with one listener (inode 77) on port 28100 and processes holding it: pid -> container id (None:
    no container; a pid whose fd directory is missing stands for one we may not read)."""
    proc = tmp_path / "proc"
    (proc / "net").mkdir(parents=True)
    (proc / "net" / "tcp").write_text(HEADER + row("0100007F:6DC4", "0A", listener_uid, 77))
    for pid, container in holders.items():
        (proc / str(pid) / "fd").mkdir(parents=True)
        os.symlink("socket:[77]", proc / str(pid) / "fd" / "3")
        os.symlink("/dev/null", proc / str(pid) / "fd" / "0")
        path = f"/system.slice/docker-{container}.scope" if container else "/user.slice/session-1.scope"
        (proc / str(pid) / "cgroup").write_text(f"0::{path}\n")
    return proc


@pytest.mark.parametrize("listener_uid, holders, problem", [
    (0, {100: CONTAINER}, None),
    (0, {100: None, 101: CONTAINER}, None),  # a forked child holds it too
    (65534, {200: None}, "port 28100 is held by another program (pid 200)"),
    (0, {200: OTHER}, "port 28100 is held by another program (pid 200)"),
    (1000, {}, None),  # the holders cannot be read: the owner is the server's user
    (65534, {}, "port 28100 is held by a socket of uid 65534, not of the server's (1000)"),
], ids=["the-container", "a-child-too", "another-program", "another-container", "unreadable-same-uid",
        "unreadable-other-uid"])
def test_a_listener_is_the_containers_when_a_process_of_its_cgroup_holds_it(tmp_path, listener_uid, holders,
                                                                              problem):
    proc = fake_proc(tmp_path, listener_uid, holders)
    server_uid = 1000 if not holders else 0
    assert claim(28100, CONTAINER, server_uid, proc) == (True, problem)


def test_nothing_listening_yet_is_not_a_problem(tmp_path):
    proc = fake_proc(tmp_path, 0, {})
    assert claim(28101, CONTAINER, 0, proc) == (False, None)
