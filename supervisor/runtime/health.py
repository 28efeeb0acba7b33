"""The startup gate: a new server is ready, has died, or has run out of time.

It races three things, as llama-swap does: the readiness endpoint answering
200 (llama-server's 503 means "still loading"), the container exiting, and a
deadline. Any failure carries the container's exit code and last log lines.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from supervisor.core.errors import ModelStartFailed
from supervisor.runtime.container_runtime import ContainerRuntime

LOG_TAIL_LINES = 30
FIRST_POLL = 0.005  # small models are ready ~0.1 s after start: poll fast at first...
MAX_POLL = 0.5  # ...and back off for the big ones that take minutes
EXIT_CHECK_EVERY = 0.1  # asking the engine whether the container exited costs more than a health probe


async def probe(session: aiohttp.ClientSession, url: str, timeout: float) -> int | None:
    """HTTP status of ``GET url``, or None when nothing answered in time."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            await response.read()
            return response.status
    except (TimeoutError, aiohttp.ClientError, OSError):
        return None


async def wait_until_ready(
    runtime: ContainerRuntime,
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
    last_exit_check = float("-inf")
    while True:
        remaining = deadline - (time.monotonic() - started)
        answer = await probe(session, url, timeout=max(0.05, min(2.0, remaining)))
        if answer == 200:
            return time.monotonic() - started
        now = time.monotonic()
        out_of_time = now - started >= deadline
        if out_of_time or now - last_exit_check >= EXIT_CHECK_EVERY:
            last_exit_check = now
            await _raise_if_exited(runtime, model, container_id)
        if out_of_time:
            logs = await runtime.logs_tail(container_id, LOG_TAIL_LINES)
            seen = f"HTTP {answer}" if answer else "no answer"
            raise ModelStartFailed(model, f"not ready within {deadline:g}s (last health check: {seen})", None, logs)
        await asyncio.sleep(min(poll, max(0.0, deadline - (now - started))))
        poll = min(MAX_POLL, poll * 1.2)


async def _raise_if_exited(runtime: ContainerRuntime, model: str, container_id: str) -> None:
    info = await runtime.inspect(container_id)
    if info is not None and not info.exited:
        return
    logs = await runtime.logs_tail(container_id, LOG_TAIL_LINES)
    reason = "container was removed during startup" if info is None else "server exited during startup"
    if info is not None and info.oom_killed:
        reason = "server was killed for lack of memory (OOM) during startup"
    raise ModelStartFailed(model, reason, info.exit_code if info else None, logs)
