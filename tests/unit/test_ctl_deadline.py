"""localllmctl's deadlines (--timeout), run as an operator would, against sockets that stand in for the daemon.

A socket that listens and never accepts is what a stopped (SIGSTOP) or wedged daemon looks like from outside:
the kernel takes the connection, and no answer ever comes. The stand-in daemon of the later tests answers, but
slowly: a stream or a long action may outlast the deadline once it has begun.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from aiohttp import web

from supervisor.cli.ctl import build_parser
from supervisor.cli.target import CHECK_TIMEOUT, deadline

from .conftest import LOCALLLMCTL

SLACK = 2.0  # seconds beyond a deadline for the interpreter to start and exit


def localllmctl(*args: str, timeout: float = 30) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run(
        [LOCALLLMCTL, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if not k.startswith("LOCALLLM_")},
    )
    return done, time.monotonic() - started


@pytest.fixture
def silent_socket(tmp_path):
    """A control socket whose connections the kernel takes and nobody ever reads: a stopped daemon's."""
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(path))
        listening.listen(64)
        yield path


def test_status_check_against_a_daemon_that_never_answers_exits_1_within_5_seconds(silent_socket):
    done, took = localllmctl("--socket", str(silent_socket), "status", "--check")
    assert done.returncode == 1, done
    assert CHECK_TIMEOUT <= took < CHECK_TIMEOUT + SLACK, took
    assert done.stdout == (
        f"unresponsive\n  localllmd on {silent_socket} did not answer GET /health within 5s "
        "(--timeout): it is stopped, stuck or overloaded; its log may say why "
        "(journalctl -u localllm)\n"
    )
    assert done.stderr == ""


def test_status_check_takes_its_timeout_before_or_after_the_command(silent_socket):
    for args in (
        ["status", "--check", "--timeout", "1"],
        ["--timeout", "1", "status", "--check"],
        ["--timeout", "30", "status", "--check", "--timeout", "1"],
    ):  # after the command wins
        done, took = localllmctl("--socket", str(silent_socket), *args)
        assert done.returncode == 1 and 1 <= took < 1 + SLACK, (args, took, done)
        assert "did not answer GET /health within 1s (--timeout)" in done.stdout, done.stdout
    done, _ = localllmctl("--socket", str(silent_socket), "status", "--check", "--json", "--timeout", "0.5")
    health = json.loads(done.stdout)
    assert health["status"] == "unresponsive" and "within 0.5s" in health["problems"][0]


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["history"],
        ["events"],
        ["events", "--follow"],
        ["logs", "-f", "tiny"],
        ["load", "tiny"],
        ["unload", "tiny", "--json"],
        ["rollback"],
    ],
    ids=" ".join,
)
def test_every_command_gives_up_on_a_daemon_that_never_answers_with_exit_3(silent_socket, command):
    done, took = localllmctl("--socket", str(silent_socket), "--timeout", "0.5", *command)
    assert done.returncode == 3, done
    assert 0.5 <= took < 0.5 + SLACK, took
    assert f"localllmctl: localllmd on {silent_socket} did not answer " in done.stderr
    assert "within 0.5s (--timeout)" in done.stderr, done.stderr


@pytest.mark.parametrize("value", ["-1", "soon", "nan", "inf"])
def test_a_timeout_that_is_not_seconds_is_bad_input(value):
    done, _ = localllmctl("--timeout", value, "status")
    assert done.returncode == 2
    assert f"argument --timeout: must be a number of seconds, 0 or more (0: no limit), not '{value}'" in done.stderr


def test_the_deadline_of_each_command():
    parse = build_parser().parse_args
    assert deadline(parse(["status", "--check"])) == 5.0
    assert deadline(parse(["status"])) == deadline(parse(["load", "m"])) == 30.0
    assert deadline(parse(["status", "--check", "--timeout", "2.5"])) == 2.5
    assert deadline(parse(["--timeout", "0", "events", "-f"])) is None  # 0: no limit
    assert deadline(parse(["--timeout", "7", "history"])) == 7.0


# -- a daemon that answers, slowly ------------------------------------------------------------


def slow_daemon(load_seconds: float) -> web.Application:
    """Its event stream opens at once and then stays quiet; a load takes ``load_seconds``; status at once."""

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if request.query.get("follow") == "true":
            await asyncio.sleep(3600)
        return response

    async def load(request: web.Request) -> web.Response:
        await asyncio.sleep(load_seconds)
        return web.json_response(
            {"name": "tiny", "state": "ready", "container": "c0ffee", "endpoint": None, "load_seconds": load_seconds}
        )

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"daemon": {"last_event_id": 0}})

    app = web.Application()
    app.router.add_get("/events", events)
    app.router.add_post("/models/{name}/load", load)
    app.router.add_get("/status", status)
    return app


async def serve(app: web.Application, path: Path) -> web.AppRunner:
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    return runner


async def run_localllmctl(*args: str) -> tuple[int, str, str, float]:
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        LOCALLLMCTL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    return process.returncode, out.decode(), err.decode(), time.monotonic() - started


def test_a_long_load_outlasts_the_deadline_once_the_daemon_has_answered(tmp_path):
    async def scenario():
        runner = await serve(slow_daemon(load_seconds=2.5), tmp_path / "control.sock")
        try:
            return await run_localllmctl("--socket", str(tmp_path / "control.sock"), "load", "tiny", "--timeout", "1")
        finally:
            await runner.cleanup()

    code, out, err, took = asyncio.run(scenario())
    assert code == 0, err
    assert out.startswith("tiny is ready") and took >= 2.5


def test_a_followed_stream_outlasts_the_deadline_once_it_is_open(tmp_path):
    async def scenario():
        runner = await serve(slow_daemon(load_seconds=0), tmp_path / "control.sock")
        process = await asyncio.create_subprocess_exec(
            LOCALLLMCTL,
            "--socket",
            str(tmp_path / "control.sock"),
            "--timeout",
            "0.5",
            "events",
            "--follow",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            notice = await asyncio.wait_for(process.stderr.readline(), 10)
            await asyncio.sleep(2)  # four deadlines
            return notice.decode(), process.returncode
        finally:
            if process.returncode is None:
                process.terminate()
            await process.communicate()
            await runner.cleanup()

    notice, code = asyncio.run(scenario())
    assert notice == f"following localllmd's events on {tmp_path / 'control.sock'} (Ctrl-C to stop)\n"
    assert code is None  # still following
