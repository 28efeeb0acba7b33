"""The startup gate: a new server is ready, has died, or has run out of time.

It races three things, as llama-swap does: the readiness endpoint answering
200 (llama-server's 503 means "still loading"), the container exiting, and a
deadline. Any failure carries the container's exit code and last log lines.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from .docker_runtime import DockerRuntime
from .errors import ModelStartFailed

LOG_TAIL_LINES = 30
FIRST_POLL = 0.05
MAX_POLL = 0.5


async def probe(session: aiohttp.ClientSession, url: str, timeout: float) -> int | None:
    """HTTP status of ``GET url``, or None when nothing answered in time."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            await response.read()
            return response.status
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return None


async def wait_until_ready(
    runtime: DockerRuntime,
    session: aiohttp.ClientSession,
    *,
    model: str,
    container_id: str,
    url: str,
    deadline: float,
) -> float:
    """Return the seconds it took to become ready; raise ModelStartFailed otherwise."""
    started = time.monotonic()
    poll = FIRST_POLL
    last_answer: int | None = None
    while True:
        remaining = deadline - (time.monotonic() - started)
        last_answer = await probe(session, url, timeout=max(0.05, min(2.0, remaining)))
        if last_answer == 200:
            return time.monotonic() - started
        info = await runtime.inspect(container_id)
        if info is None or info.exited:
            logs = await runtime.logs_tail(container_id, LOG_TAIL_LINES)
            reason = "container was removed during startup" if info is None else "server exited during startup"
            if info is not None and info.oom_killed:
                reason = "server was killed for lack of memory (OOM) during startup"
            raise ModelStartFailed(model, reason, info.exit_code if info else None, logs)
        if time.monotonic() - started >= deadline:
            logs = await runtime.logs_tail(container_id, LOG_TAIL_LINES)
            answer = f"HTTP {last_answer}" if last_answer else "no answer"
            raise ModelStartFailed(model, f"not ready within {deadline:g}s (last health check: {answer})", None, logs)
        await asyncio.sleep(min(poll, max(0.0, deadline - (time.monotonic() - started))))
        poll = min(MAX_POLL, poll * 1.5)
