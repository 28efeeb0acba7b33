"""Streams as the proxy passes them on: whether one is complete, its first event, and an error at its end.

The proxy never parses a stream's chunks; ``StreamEnd`` finds from the bytes alone whether a
stream said how it ended (OpenAI chat and text completions, Anthropic Messages, OpenAI Responses).
An error after the headers went out becomes an error event in the route's dialect.
"""

from __future__ import annotations

import contextlib
import json
import secrets

from aiohttp import web

from supervisor.api.dialects import error_event
from supervisor.api.routes import Dialect
from supervisor.api.web_errors import public_error
from supervisor.core.errors import LocalllmError

# The status a stream that ended in an error event is counted under in the metrics (its headers said 200).
ERROR_STATUS = web.ResponseKey("localllm_error_status", int)


class StreamEnd:
    """Whether the SSE bytes fed so far make a complete stream, found without parsing any JSON.

    Complete means that it said how it ended, and that it stops between events (SSE drops an event
    cut off before its blank line). An ending is ``data: [DONE]`` (OpenAI's shape, llama-server's
    and Ollama's), a non-null ``finish_reason`` (chat and ``/completions`` chunks) or ``stop_reason``
    (Anthropic's ``message_delta``), Anthropic's ``event: message_stop``, the Responses API's
    ``event: response.completed`` (or ``incomplete``, ``failed``), or an error event the upstream sent
    itself. The quoted markers cannot occur inside a JSON string, where quotes are escaped, and the
    others must start a line, which JSON text cannot (its newlines are escaped).
    The last bytes of each read are kept, so a marker split across two reads is still found.
    ``mid_event``: the bytes so far stop inside an event, and anything written next would be glued to it.
    """

    MARKERS = (
        b"\ndata: [DONE]",
        b"\ndata:[DONE]",
        b'"finish_reason":"',
        b'"finish_reason": "',
        b'"stop_reason":"',
        b'"stop_reason": "',
        b"\nevent: message_stop",
        b"\nevent: response.completed",  # OpenAI Responses: completed, incomplete (a limit) or failed
        b"\nevent: response.incomplete",
        b"\nevent: response.failed",
        b"\nevent: error",  # Anthropic's and Responses' error events
        b'\ndata: {"error"',
        b'\ndata:{"error"',
    )
    KEEP = max(len(marker) for marker in MARKERS) - 1

    def __init__(self) -> None:
        self._said_end = False
        self._tail = b"\n\n"  # the stream starts between events, at the start of a line

    def feed(self, chunk: bytes) -> None:
        window = self._tail + chunk
        self._said_end = self._said_end or any(marker in window for marker in self.MARKERS)
        self._tail = window[-self.KEEP :]

    @property
    def complete(self) -> bool:
        return self._said_end and not self.mid_event

    @property
    def mid_event(self) -> bool:
        return not self._tail.endswith((b"\n\n", b"\r\n\r\n"))


def with_message_start(event: bytes, model: str) -> bytes:
    """An Anthropic Messages stream that begins with ``message_start``: llama-server sends it only with a first
    token decoded alone (``n_decoded == 1``), and the anthropic SDKs build the whole message from it."""
    if event.startswith(b"event: message_start"):
        return event
    start = {
        "type": "message_start",
        "message": {
            "id": f"msg_localllm_{secrets.token_hex(8)}",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        },
    }
    return b"event: message_start\ndata: " + json.dumps(start).encode() + b"\n\n" + event


def with_assistant_role(event: bytes) -> bytes:
    """A chat completion chunk event whose first choice's delta has ``role: assistant``; others unchanged."""
    if not event.startswith(b"data: {"):
        return event
    try:
        chunk = json.loads(event[6:])
        delta = chunk["choices"][0]["delta"]
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        return event  # not a chunk it can read (or too deep to): passed on as it came
    if not isinstance(delta, dict) or "role" in delta:
        return event
    chunk["choices"][0]["delta"] = {"role": "assistant", **delta}
    try:
        text = json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # a lone surrogate escape ("\ud800") cannot be UTF-8: kept as an escape
        text = json.dumps(chunk, separators=(",", ":")).encode()
    return b"data: " + text + b"\n\n"


def sse_headers(content_type: str) -> dict[str, str]:
    return {"Content-Type": content_type, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def write_error_event(
    response: web.StreamResponse,
    error: LocalllmError,
    model: str,
    dialect: Dialect = Dialect.OPENAI,
    after_partial_event: bool = False,
) -> None:
    """An error after the stream started: an error event in the route's dialect, then the end.

    After a partial event, blank lines end that one first, so the error is an event of its own. The
    metrics count the request under the error's status, not the 200 its headers carried. The client
    sees what it may see of the error (web_errors.public_error).
    """
    response[ERROR_STATUS] = error.http_status
    separator = b"\n\n" if after_partial_event else b""
    with contextlib.suppress(ConnectionResetError):
        await response.write(separator + error_event(dialect, public_error(error, model), error.http_status))
        await response.write_eof()
