"""The one rewrite the proxy makes: the first streamed chunk always names the assistant role."""

from __future__ import annotations

import json

import pytest

from supervisor.proxy import with_assistant_role


def event(delta: dict) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": delta}], "id": "x"}).encode() + b"\n\n"


def test_a_first_chunk_without_role_gets_it_and_keeps_its_content():
    rewritten = with_assistant_role(event({"content": "hé"}))
    assert rewritten.endswith(b"\n\n")
    chunk = json.loads(rewritten[6:])
    assert chunk["choices"][0]["delta"] == {"role": "assistant", "content": "hé"}
    assert chunk["id"] == "x"


@pytest.mark.parametrize("untouched", [
    event({"role": "assistant", "content": None}),
    b"data: [DONE]\n\n",
    b": a comment\n\n",
    b"data: {not json}\n\n",
    b'data: {"choices": []}\n\n',
    b'data: {"object": "text_completion", "choices": [{"text": "hi"}]}\n\n',
])
def test_anything_else_passes_unchanged(untouched):
    assert with_assistant_role(untouched) == untouched
