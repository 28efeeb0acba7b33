"""What a streaming client sees while its model loads (``loading_progress``).

Clients give up when headers take minutes (LibreChat's among them), so a streaming request that
must wait gets its 200 and then, every few seconds: SSE comments (``comments``), which every
client skips; or chat chunks whose ``delta.reasoning_content`` says what is happening
(``reasoning``: "loading llama3 on gpu0 (12 s, 2 models evicted)…"), which chat UIs show as the
model's thinking. The answer that follows, and its usage, are the model's own.
"""

from __future__ import annotations

import json
import secrets
import time

from aiohttp import web

from supervisor.fleet.events import EventKind
from supervisor.fleet.instance import Instance
from supervisor.fleet.owner import Fleet

KEEPALIVE_SECONDS = 5.0


class LoadingNotes:
    """Writes one note when the wait starts, one every ``KEEPALIVE_SECONDS``, and one when the model is ready."""

    def __init__(self, fleet: Fleet, instance: Instance, response: web.StreamResponse, reasoning: bool):
        self.fleet = fleet
        self.instance = instance
        self.response = response
        self.reasoning = reasoning
        self.started = time.monotonic()
        self.since_event = fleet.events.last_id
        self.chunk_id = f"chatcmpl-localllm-loading-{secrets.token_hex(6)}"

    async def begin(self) -> None:
        await self._write(f"loading {self.instance.name}{self._where()}…", f"loading model {self.instance.name}")

    async def still(self) -> None:
        await self._write(
            f"\nstill loading {self.instance.name}{self._where()} ({self._progress()})…",
            f"still loading {self.instance.name}",
        )

    async def ready(self) -> None:
        if self.reasoning:  # a comment needs no last word: the answer follows at once
            await self._write(f"\n{self.instance.name} is ready ({self._progress()}).\n\n", "")

    def _where(self) -> str:
        device = self.fleet.scheduler.view(self.instance.name).device
        return f" on {device}" if device else ""

    def _progress(self) -> str:
        seconds = f"{time.monotonic() - self.started:.0f} s"
        evicted = sum(1 for event in self.fleet.events.recent(self.since_event) if event.kind is EventKind.EVICT)
        return seconds + (f", {evicted} model{'s' if evicted != 1 else ''} evicted" if evicted else "")

    async def _write(self, reasoning: str, comment: str) -> None:
        if not self.reasoning:
            await self.response.write(f": localllm: {comment}\n\n".encode())
            return
        chunk = {
            "id": self.chunk_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.instance.name,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "reasoning_content": reasoning}, "finish_reason": None}
            ],
        }
        await self.response.write(b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n")
