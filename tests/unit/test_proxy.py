"""What the proxy reads of a stream it passes through: the first chunk always names the assistant role,
and a stream that ends without saying how it ended is told apart from a complete one."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.api.streams import StreamEnd, with_assistant_role


def event(delta: dict) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": delta}], "id": "x"}).encode() + b"\n\n"


def test_a_first_chunk_without_role_gets_it_and_keeps_its_content():
    rewritten = with_assistant_role(event({"content": "hé"}))
    assert rewritten.endswith(b"\n\n")
    chunk = json.loads(rewritten[6:])
    assert chunk["choices"][0]["delta"] == {"role": "assistant", "content": "hé"}
    assert chunk["id"] == "x"


@pytest.mark.parametrize(
    "untouched",
    [
        event({"role": "assistant", "content": None}),
        b"data: [DONE]\n\n",
        b": a comment\n\n",
        b"data: {not json}\n\n",
        b'data: {"choices": []}\n\n',
        b'data: {"object": "text_completion", "choices": [{"text": "hi"}]}\n\n',
    ],
)
def test_anything_else_passes_unchanged(untouched):
    assert with_assistant_role(untouched) == untouched


# Streams as the pinned llama-server (b11312) sends them, shortened; Ollama's /v1 has the same compact shape.
CHAT_TOKEN = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"p"}}],"created":1796007952,'
    b'"id":"chatcmpl-4X","model":"tiny","object":"chat.completion.chunk"}\n\n'
)
CHAT_FINISH = (
    b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1796007952,'
    b'"id":"chatcmpl-4X","model":"tiny","object":"chat.completion.chunk"}\n\n'
)
COMPLETION_TOKEN = (
    b'data: {"choices":[{"text":" ping","index":0,"logprobs":null,"finish_reason":null}],'
    b'"model":"tiny","object":"text_completion","id":"chatcmpl-jc"}\n\n'
)
COMPLETION_FINISH = (
    b'data: {"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"stop"}],'
    b'"model":"tiny","object":"text_completion","id":"chatcmpl-jc"}\n\n'
)
DONE = b"data: [DONE]\n\n"
# What Ollama sends when its runner fails mid-generation: an empty chunk, then the body ends.
OLLAMA_CUT = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"tiny-a:1b","choices":'
    b'[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
)
ANTHROPIC = (
    b'event: message_start\ndata: {"type":"message_start","message":{"stop_reason":null}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"o"}}\n\n'
)
ANTHROPIC_END = (
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"max_tokens"}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)

ENDED = {
    "chat, complete": [CHAT_TOKEN, CHAT_TOKEN, CHAT_FINISH, DONE],
    "chat, finish reason but no [DONE]": [CHAT_TOKEN, CHAT_FINISH],
    "chat, [DONE] but no finish reason": [CHAT_TOKEN, DONE],
    "completions, complete": [COMPLETION_TOKEN, COMPLETION_FINISH, DONE],
    "completions, finish reason but no [DONE]": [COMPLETION_TOKEN, COMPLETION_FINISH],
    "JSON written with spaces": [b'data: {"choices": [{"finish_reason": "stop", "delta": {}}]}\n\n'],
    "SSE without the space after data:": [CHAT_TOKEN, b"data:[DONE]\n\n"],
    "CRLF line ends": [CHAT_TOKEN.replace(b"\n", b"\r\n"), b"data: [DONE]\r\n\r\n"],
    "only [DONE]": [DONE],
    "anthropic, complete": [ANTHROPIC, ANTHROPIC_END],
    "anthropic, message_stop alone": [ANTHROPIC, b'event: message_stop\ndata: {"type":"message_stop"}\n\n'],
    "the upstream's own error event": [CHAT_TOKEN, b'data: {"error":{"code":500,"message":"boom"}}\n\n'],
}
NOT_ENDED = {
    "nothing at all": [],
    "an empty read": [b""],
    "tokens only": [CHAT_TOKEN, CHAT_TOKEN],
    "completions tokens only": [COMPLETION_TOKEN],
    "Ollama's cut": [CHAT_TOKEN, OLLAMA_CUT],
    "cut inside an event": [CHAT_TOKEN, CHAT_FINISH[:40]],
    "anthropic without its end": [ANTHROPIC],
    "SSE comments only": [b": localllm: loading model tiny\n\n"],
    # A model may write anything: in JSON text, quotes and newlines are escaped, so no marker matches.
    "markers inside the generated text": [
        b'data: {"choices":[{"delta":{"content":"data: [DONE] \\"finish_reason'
        b'\\":\\"stop\\" \\ndata: [DONE]"},"finish_reason":null}]}\n\n'
    ],
}


def fed(chunks: list[bytes]) -> StreamEnd:
    ending = StreamEnd()
    for chunk in chunks:
        ending.feed(chunk)
    return ending


@pytest.mark.parametrize("chunks", ENDED.values(), ids=ENDED.keys())
def test_a_stream_that_says_how_it_ended_is_found_complete(chunks):
    assert fed(chunks).complete
    assert fed([b"".join(chunks)]).complete


@pytest.mark.parametrize("chunks", NOT_ENDED.values(), ids=NOT_ENDED.keys())
def test_a_stream_without_done_or_a_finish_reason_is_not(chunks):
    assert not fed(chunks).complete
    assert not fed([bytes([b]) for b in b"".join(chunks)]).complete


@pytest.mark.parametrize(
    "ending",
    [CHAT_FINISH, COMPLETION_FINISH, DONE, ANTHROPIC_END, b'data: {"choices": [{"finish_reason": "stop"}]}\n\n'],
)
def test_a_marker_split_across_reads_at_any_byte_is_found(ending):
    stream = CHAT_TOKEN + ending
    for cut in range(len(stream) + 1):
        assert fed([stream[:cut], stream[cut:]]).complete, cut
    assert fed([bytes([b]) for b in stream]).complete


@given(st.sampled_from(list(ENDED.values()) + list(NOT_ENDED.values())), st.lists(st.integers(0, 2000), max_size=12))
def test_how_the_bytes_are_cut_into_reads_never_changes_the_verdict(chunks, cuts):
    stream = b"".join(chunks)
    points = sorted({min(c, len(stream)) for c in cuts})
    reads = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)])]
    assert fed(reads).complete == fed([stream]).complete


def test_mid_event_says_whether_the_bytes_stop_inside_an_event():
    assert not fed([]).mid_event
    assert not fed([CHAT_TOKEN, CHAT_TOKEN[:10], CHAT_TOKEN[10:]]).mid_event
    assert not fed([CHAT_TOKEN.replace(b"\n", b"\r\n")]).mid_event
    assert fed([CHAT_TOKEN, CHAT_FINISH[:40]]).mid_event
    assert fed([CHAT_TOKEN[:-1]]).mid_event
