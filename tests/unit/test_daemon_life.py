"""supervisor.daemon: the signals as the daemon hears them, and a shutdown after a startup that failed part way.

The signals are real ones, sent to this process while the daemon's handlers are installed on the test's loop;
the forced exit is recorded instead of taken. tests/integration/test_daemon_startup.py sends them to a real
daemon whose shutdown is slow.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from loguru import logger

from supervisor.config.settings import Config
from supervisor.core.errors import DockerUnavailable
from supervisor.daemon import Daemon


def daemon_for(tmp_path, **settings) -> Daemon:
    config = Config.model_validate(
        {"profile": "cpu-only", "models": [], "daemon": {"state_dir": str(tmp_path / "state"), **settings}}
    )
    return Daemon(config, None)


@pytest.fixture
def messages():
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(message.record["message"]), level="INFO")
    yield lines
    logger.remove(sink)


async def until(condition, what: str, timeout: float = 5.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


@pytest.mark.parametrize(
    "first, second, status",
    [(signal.SIGTERM, signal.SIGTERM, 143), (signal.SIGINT, signal.SIGINT, 130), (signal.SIGTERM, signal.SIGINT, 130)],
)
def test_the_first_signal_stops_the_daemon_and_a_second_one_ends_it_at_once(tmp_path, messages, first, second, status):
    daemon = daemon_for(tmp_path)
    exits: list[int] = []
    daemon._exit = exits.append
    ran: list[str] = []
    daemon.before_forced_exit.append(lambda: ran.append("removed the demo's directory"))

    async def scenario():
        daemon._install_signal_handlers()
        os.kill(os.getpid(), first)
        await until(daemon.stopping.is_set, "the stop")
        await asyncio.sleep(0.1)
        assert exits == []  # the first one only stops, gracefully
        os.kill(os.getpid(), second)
        await until(lambda: exits, "the forced exit")
        daemon._on_signals.cancel()

    asyncio.run(scenario())
    assert exits == [status]
    assert ran == ["removed the demo's directory"]
    assert messages[0] == f"{first.name}: shutting down; a second SIGTERM or SIGINT exits at once"
    assert messages[-1] == (
        f"{second.name} again during the shutdown: exiting now with status {status}, without "
        "waiting for it to finish; model containers still running are adopted or removed at "
        "the next start"
    )


def test_a_sighup_during_the_shutdown_is_ignored_and_no_exit_is_forced(tmp_path, messages):
    daemon = daemon_for(tmp_path)
    exits: list[int] = []
    daemon._exit = exits.append

    async def scenario():
        daemon._install_signal_handlers()
        os.kill(os.getpid(), signal.SIGTERM)
        await until(daemon.stopping.is_set, "the stop")
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: "SIGHUP ignored: localllmd is shutting down" in messages, "the SIGHUP")
        daemon._on_signals.cancel()

    asyncio.run(scenario())
    assert exits == []


def test_a_startup_that_fails_before_the_fleet_is_taken_down_and_its_error_kept(tmp_path, messages):
    daemon = daemon_for(tmp_path, docker_url=f"unix://{tmp_path}/absent.sock")
    with pytest.raises(DockerUnavailable, match=f"Docker engine not reachable at unix://{tmp_path}/absent.sock"):
        asyncio.run(daemon.run())
    assert daemon.fleet is None and daemon.runners == []
    assert "localllmd stopped cleanly" not in messages
    assert not daemon.stopping.is_set()
    again = daemon_for(tmp_path, docker_url=f"unix://{tmp_path}/absent.sock")  # the lock was let go
    with pytest.raises(DockerUnavailable):
        asyncio.run(again.run())
