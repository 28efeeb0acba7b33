"""localllmctl's deadline (--timeout) over the TCP control API: it covers connecting, and TLS's handshake too.

test_ctl_deadline.py shows it on the unix sockets, where the kernel takes every connection. Over TCP a daemon can
also stall earlier: a listener whose queue is full takes no connection at all (the kernel drops the SYN), and one
that takes the connection and never speaks TLS leaves the handshake waiting. Either is a daemon that does not
answer: exit 3 (``status --check``: 1) within the deadline.
"""

from __future__ import annotations

import socket

import pytest

from .test_ctl_deadline import SLACK, localllmctl


@pytest.fixture
def full_listener():
    """A TCP port whose listener's queue of one is taken: connecting waits (the kernel drops the SYN)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            yield f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_tls():
    """A TCP port whose connections the kernel takes and nobody serves: the TLS handshake never ends."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"https://127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize("where", ["full_listener", "silent_tls"])
@pytest.mark.parametrize("command", [["status"], ["load", "tiny"], ["events", "--follow"]], ids=" ".join)
def test_a_tcp_daemon_that_takes_no_connection_or_no_handshake_is_given_up_on_within_the_deadline(
    request, where, command
):
    url = request.getfixturevalue(where)
    done, took = localllmctl("--url", url, "--timeout", "0.5", *command)
    assert done.returncode == 3, done
    assert 0.5 <= took < 0.5 + SLACK, took
    assert f"localllmctl: localllmd on {url} " in done.stderr and "within 0.5s (--timeout)" in done.stderr, done.stderr


def test_status_check_over_tcp_exits_1_within_its_deadline(full_listener):
    done, took = localllmctl("--url", full_listener, "status", "--check", "--timeout", "0.5")
    assert done.returncode == 1, done
    assert 0.5 <= took < 0.5 + SLACK, took
    assert done.stdout.startswith(f"unresponsive\n  localllmd on {full_listener} "), done.stdout
