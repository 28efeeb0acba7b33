"""localllmctl's side of the control API: one request, or a stream of lines or server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from .errors import EXIT_BAD_INPUT, EXIT_FAILURE, ControlUnreachable, LocalllmError


class RemoteError(LocalllmError):
    """An error the daemon answered with; bad input on our side exits 2, anything else 1."""

    BAD_INPUT = {"invalid_config", "bad_request", "apply_refused", "model_not_found", "not_found"}

    def __init__(self, message: str, code: str, body: dict | None = None):
        super().__init__(message)
        self.code = code
        self.body = body or {}
        self.exit_code = EXIT_BAD_INPUT if code in self.BAD_INPUT else EXIT_FAILURE


@dataclass(frozen=True)
class Target:
    """Where the daemon's control API is: a unix socket, or a TCP URL with its token."""

    socket: Path | None = None
    url: str | None = None
    token: str | None = None

    def __str__(self) -> str:
        return self.url or str(self.socket)


class ControlClient:
    def __init__(self, target: Target):
        self.target = target

    @asynccontextmanager
    async def _session(self):
        if self.target.url:
            connector, base = aiohttp.TCPConnector(), self.target.url.rstrip("/")
        else:
            connector, base = aiohttp.UnixConnector(path=str(self.target.socket)), "http://localllmd"
        headers = {"Authorization": f"Bearer {self.target.token}"} if self.target.token else {}
        try:
            async with aiohttp.ClientSession(base, connector=connector, headers=headers,
                                             timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)) as session:
                yield session
        except (aiohttp.ClientConnectionError, FileNotFoundError, PermissionError) as exc:
            raise ControlUnreachable(f"localllmd is not reachable on {self.target}: {exc}") from None

    async def request(self, method: str, route: str, body: dict | None = None,
                      params: dict | None = None) -> dict:
        """One call; an error answer becomes a RemoteError carrying its stable code."""
        async with self._session() as session:
            async with session.request(method, route, json=body, params=params) as response:
                answer = await response.json(content_type=None)
                _raise_for_error(response.status, answer)
                return answer

    async def get(self, route: str, params: dict | None = None) -> dict:
        return await self.request("GET", route, params=params)

    async def lines(self, route: str, params: dict | None = None) -> AsyncIterator[str]:
        """A streamed text answer, line by line (container logs)."""
        async with self._session() as session:
            async with session.get(route, params=params) as response:
                if response.status >= 400:
                    _raise_for_error(response.status, await response.json(content_type=None))
                async for raw in response.content:
                    yield raw.decode(errors="replace").rstrip("\n")

    async def events(self, params: dict | None = None, on_open=None) -> AsyncIterator[dict]:
        """The daemon's event stream: each ``data:`` payload of the SSE answer, parsed.

        ``on_open`` is called once the daemon has subscribed us: no later event can be missed.
        """
        async with self._session() as session:
            async with session.get("/events", params=params) as response:
                if response.status >= 400:
                    _raise_for_error(response.status, await response.json(content_type=None))
                if on_open is not None:
                    on_open()
                kind = ""
                async for raw in response.content:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:"):
                        data = json.loads(line[5:])
                        if kind == "overflow":
                            raise RemoteError(f"events: {data.get('message', 'too slow')}", "overflow")
                        yield data


def _raise_for_error(status: int, answer: object) -> None:
    if status < 400:
        return
    error = answer.get("error", {}) if isinstance(answer, dict) else {}
    raise RemoteError(error.get("message", f"HTTP {status}"), error.get("code", ""),
                      answer if isinstance(answer, dict) else None)
