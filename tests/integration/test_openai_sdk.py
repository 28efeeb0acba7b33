"""Acceptance: the official ``openai`` SDK through the proxy, against real llama-server containers.

Streaming (role, content, finish_reason), tool calls streamed as deltas, ``stream_options.include_usage``,
and a stream the client closes half-way, which must stop the generation inside llama-server.

The generated models have random weights, so the answers are noise; what is checked is their shape, and
that the proxy hands on exactly what llama-server sends. Comparisons use greedy decoding (temperature 0)
and ``cache_prompt: false``, so that the same request gives the same tokens every time.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import openai
import pytest
import requests

from supervisor.runtime import tinygguf
from supervisor.runtime.tinygguf import SPECIAL_TOKENS, write_tiny_model

from .conftest import ask_server, poll_for

HI = [{"role": "user", "content": "hi"}]
GREEDY = {"temperature": 0, "seed": 7}
NO_CACHE = {"cache_prompt": False}  # llama-server: evaluate the whole prompt each time, so results repeat exactly
KEEP_CACHE_FIELD = {"request_fields": {"drop": ["id_slot"]}}  # the proxy drops cache_prompt by default

# A chat template in the style of Llama 3.x: a tool call is a bare JSON object {"name": ..., "arguments": ...}.
# llama-server (--jinja is on by default in this build) derives a tool-call parser and grammar from it.
TOOL_TEMPLATE = """\
{%- if tools %}<|system|>
Tools: {{ tools | tojson }}
Call one as {"name": NAME, "arguments": ARGS}<|end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|assistant|>
{% for call in message.tool_calls %}{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}{% endfor %}<|end|>
{% elif message.role == "tool" %}<|tool|>
{{ message.content }}<|end|>
{% else %}<|{{ message.role }}|>
{{ message.content }}<|end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>
{% endif %}"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
# With tool_choice "required" the grammar admits free text up to the "{" that opens the call, or the call at
# once. A random model may ramble forever, so "{" (a byte token in the generated vocabulary) is made certain;
# from there the grammar spells out the call, and the enum keeps the arguments short.
OPEN_BRACE_TOKEN = len(SPECIAL_TOKENS) + ord("{")
TOOL_REQUEST = {
    "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
    "max_tokens": 200,
    "tools": [WEATHER_TOOL],
    "tool_choice": "required",
    "parallel_tool_calls": False,
    "logit_bias": {str(OPEN_BRACE_TOKEN): 100},
    **GREEDY,
}


def client_for(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.proxy_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory) -> Path:
    """A generated model that carries ``TOOL_TEMPLATE`` and does not prefix text with a space.

    Without the space prefix, llama-server's grammar, which starts by matching the template's generation
    prompt, sees the same tokens as the prompt (this tiny vocabulary has no "▁" token of its own).
    """
    path = tmp_path_factory.mktemp("tool-model") / "tools.gguf"
    plain = tinygguf._write_metadata

    def with_template(writer, gguf, shape, name) -> None:
        plain(writer, gguf, shape, name)
        writer.add_chat_template(TOOL_TEMPLATE)
        writer.add_add_space_prefix(False)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tinygguf, "_write_metadata", with_template)
        write_tiny_model(path, seed=1, name="tools")
    return path


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> Path:
    """Like conftest's ``slow.gguf`` (a few ms per token), with room for 16k tokens: llama-server caps a slot's
    context at the model's trained length, and a generation that can run for many seconds must not end on
    its own while the test watches it."""
    path = tmp_path_factory.mktemp("long-model") / "long.gguf"
    return write_tiny_model(path, embedding=384, blocks=6, heads=6, kv_heads=2, context=16384, seed=5, name="long")


def sse_events(raw: bytes) -> list[bytes]:
    """The ``data:`` payloads of an SSE body, in order (comments and blank lines dropped)."""
    return [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]


# Fields llama-server draws at random or from the clock, per request: ids, timestamps and timings.
VOLATILE = re.compile(rb'"(id|created|timings)":("[^"]*"|\d+|\{[^}]*\})')


def normalized(raw: bytes) -> bytes:
    return VOLATILE.sub(rb'"\1":"-"', raw)


def raw_stream(url: str, body: dict) -> bytes:
    with requests.post(url, json={**body, "stream": True}, stream=True, timeout=120) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return b"".join(response.iter_content(chunk_size=None))


def assemble_tool_calls(deltas) -> dict[int, dict]:
    """Tool calls put together from streamed deltas, the way OpenAI clients do (by ``index``)."""
    calls: dict[int, dict] = {}
    for delta in deltas:
        for part in delta.get("tool_calls") or []:
            call = calls.setdefault(part["index"], {"id": None, "type": None, "name": "", "arguments": ""})
            call["id"] = part.get("id") or call["id"]
            call["type"] = part.get("type") or call["type"]
            function = part.get("function") or {}
            call["name"] += function.get("name") or ""
            call["arguments"] += function.get("arguments") or ""
    return calls


def test_streaming_through_the_sdk_assembles_the_same_answer_as_a_plain_call(start_daemon, engine):
    daemon = start_daemon([{"name": "tiny", "aliases": ["tiny-chat"], "gguf": "tiny.gguf", "preload": True}])
    request = {"messages": HI, "max_tokens": 12, **GREEDY}
    extra = {**NO_CACHE, "ignore_eos": True}
    with client_for(daemon) as client:
        reply = client.chat.completions.create(model="tiny-chat", **request, extra_body=extra)
        chunks = list(client.chat.completions.create(model="tiny-chat", stream=True, **request, extra_body=extra))
    direct = ask_server(
        engine, daemon, "tiny", "/v1/chat/completions", {"model": "tiny", **request, **extra, "stream": True}
    )
    direct_content = "".join(
        json.loads(e)["choices"][0]["delta"].get("content") or "" for e in sse_events(direct) if e != b"[DONE]"
    )

    assert isinstance(reply, openai.types.chat.ChatCompletion)
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12

    assert len(chunks) >= 3
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and {c.model for c in chunks} == {"tiny"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content and content == direct_content
    # llama-server holds back the bytes of an unfinished UTF-8 character when streaming, and the generated
    # vocabulary is mostly bytes: at the max_tokens cut, the plain answer may end in one more U+FFFD.
    assert reply.choices[0].message.content in (content, content + "\ufffd")


def test_include_usage_adds_a_final_chunk_with_usage_and_no_choices(start_daemon):
    daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf", "preload": True}])
    with client_for(daemon) as client:
        chunks = list(
            client.chat.completions.create(
                model="tiny",
                messages=HI,
                max_tokens=7,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )
    *answer, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 7
    assert last.usage.prompt_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert answer[0].choices[0].delta.role == "assistant"
    assert answer[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None and len(c.choices) == 1 for c in answer)
    assert len({c.id for c in chunks}) == 1


def test_streamed_tool_calls_arrive_intact_through_the_proxy(start_daemon, tool_model, engine):
    daemon = start_daemon(
        [{"name": "tools", "gguf": str(tool_model), "context_size": 1024, "preload": True}], **KEEP_CACHE_FIELD
    )
    body = {"model": "tools", **TOOL_REQUEST, **NO_CACHE}
    # Raw bytes: the proxy's stream is llama-server's own, event for event, byte for byte.
    direct = ask_server(engine, daemon, "tools", "/v1/chat/completions", {**body, "stream": True})
    proxied = raw_stream(f"{daemon.proxy_url}/chat/completions", body)
    assert normalized(proxied) == normalized(direct)
    events = [json.loads(e) for e in sse_events(direct) if e != b"[DONE]"]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert sum("tool_calls" in d for d in deltas) >= 3, "the call should come in several deltas"
    [expected] = assemble_tool_calls(deltas).values()
    assert expected["type"] == "function" and expected["name"] == "get_weather"
    assert json.loads(expected["arguments"]) in ({"city": "Paris"}, {"city": "Rome"})

    # Through the SDK: the deltas put together give the same call (its id is drawn anew by each request).
    with client_for(daemon) as client:
        chunks = list(client.chat.completions.create(model="tools", stream=True, **TOOL_REQUEST, extra_body=NO_CACHE))
        reply = client.chat.completions.create(model="tools", **TOOL_REQUEST, extra_body=NO_CACHE)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    sdk_deltas = [c.choices[0].delta.model_dump(exclude_none=True) for c in chunks]
    [call] = assemble_tool_calls(sdk_deltas).values()
    assert isinstance(call["id"], str) and call["id"]
    assert {**call, "id": None} == {**expected, "id": None}

    # Not streamed, the SDK parses the same call out of the message.
    assert reply.choices[0].finish_reason == "tool_calls"
    [whole] = reply.choices[0].message.tool_calls
    assert (whole.type, whole.function.name, whole.function.arguments) == (
        "function",
        "get_weather",
        expected["arguments"],
    )
    assert whole.id


def test_closing_the_sdk_stream_stops_the_generation_in_llama_server(start_daemon, long_model, engine):
    # --slots: llama-server's slot view (off by default: it shows prompts), on the server's socket only
    daemon = start_daemon(
        [{"name": "long", "gguf": str(long_model), "context_size": 16384, "preload": True, "extra_args": ["--slots"]}]
    )

    def slot() -> dict:
        [only] = json.loads(ask_server(engine, daemon, "long", "/slots"))  # the profile runs one slot
        return only

    def decoded(state: dict) -> int:
        return state["next_token"][0]["n_decoded"]

    with client_for(daemon) as client:
        stream = client.chat.completions.create(
            model="long",
            messages=[{"role": "user", "content": "count"}],
            stream=True,
            max_tokens=100000,
            extra_body={"ignore_eos": True},
        )
        chunks = iter(stream)
        for _ in range(3):
            assert next(chunks).choices
        first, first_at = slot(), time.monotonic()
        assert first["is_processing"]

        # The control: while the client keeps the stream open, llama-server goes on generating.
        time.sleep(1.5)
        before, before_at = slot(), time.monotonic()
        assert before["is_processing"] and before["id_task"] == first["id_task"]
        pace = (decoded(before) - decoded(first)) / (before_at - first_at)  # tokens per second
        assert pace > 0
        # Without context shift (off by default) a generation ends when the slot is full; "n_prompt_tokens"
        # counts every token in the slot, the generated ones included.
        room = before["n_ctx"] - before["n_prompt_tokens"]

        stream.close()
        closed_at = time.monotonic()
        poll_for(lambda: not slot()["is_processing"], timeout=5, what="llama-server to stop generating")
        stopped_after = time.monotonic() - closed_at

    # It stopped because the client left, not because it ran out of room: at its pace it had far longer to go.
    assert room / pace > 2 * stopped_after + 2, (room, pace, stopped_after)
    poll_for(lambda: daemon.model("long")["in_flight"] == 0, timeout=5, what="in-flight count back to 0")
    with client_for(daemon) as client:
        assert client.chat.completions.create(model="long", messages=HI, max_tokens=2).choices
