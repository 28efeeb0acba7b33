"""The generated reranker and tool-calling models (``tinygguf``'s kinds) in real llama-server containers.

Both run under the daemon like any catalog model. The answers are checked on the model's own server
(``ask_server``: llama-server's own answer to the generated model) and through the proxy, routed by
``model``: reranking on every spelling, chat, and Anthropic's tool-use round trip with the official SDK.

- The reranker (qwen3, RANK pooling, a "yes"/"no" head behind a softmax) started with ``--reranking`` scores
  every document with a probability; without the head's softmax a score would be a raw hidden value.
- The tools model answers a required tool call with one well-formed call, through Chat Completions, Anthropic
  Messages and Responses alike, and takes the call and its result back as history.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import anthropic
import pytest
import requests

from supervisor.core.containers import Endpoint, servers_dir
from supervisor.runtime.tinygguf import write_tiny_model
from supervisor.runtime.upstream import open_session

from .conftest import ask_server, our_containers

QUERY = "what is a cat"
DOCUMENTS = ["a cat is an animal", "the sky is blue", "cars drive on roads", "cat"]

CITY = {"type": "string", "enum": ["Paris", "Rome"]}
WEATHER = {"type": "object", "properties": {"city": CITY}, "required": ["city"], "additionalProperties": False}
OPENAI_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather", "parameters": WEATHER}}
]
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "The weather", "input_schema": WEATHER}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CITIES = ({"city": "Paris"}, {"city": "Rome"})


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("generated")
    return {
        "reranker": write_tiny_model(directory / "rerank.gguf", kind="reranker", seed=1, name="rerank"),
        "tools": write_tiny_model(directory / "tools.gguf", kind="tools", seed=1, name="tools"),
    }


def call_server(engine, daemon, model: str, path: str, body: dict) -> tuple[int, bytes]:
    """POST ``body`` to ``model``'s own server, on its socket: the status and the raw answer, whatever they are."""
    [container] = [c for c in our_containers(engine, daemon.instance) if c.labels["io.localllm.model"] == model]
    endpoint = Endpoint.from_label(container.labels["io.localllm.endpoint"])

    async def call():
        async with open_session(servers_dir(Path(daemon.config["daemon"]["state_dir"]))) as session:
            async with session.post(endpoint.url + path, json=body, timeout=aiohttp.ClientTimeout(total=60)) as answer:
                return answer.status, await answer.read()

    return asyncio.run(call())


def sse(raw: bytes) -> list[tuple[str | None, dict | str]]:
    """(event name, data) of each event of an SSE body; data parsed when it is JSON."""
    events = []
    for block in raw.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in lines:
            data = lines["data"]
            events.append((lines.get("event"), data if data == "[DONE]" else json.loads(data)))
    return events


def test_reranker_scores_every_document_through_its_classification_head(start_daemon, engine, generated):
    rerank = str(generated["reranker"])
    daemon = start_daemon(
        [
            {"name": "rerank", "gguf": rerank, "context_size": 1024, "extra_args": ["--reranking"], "preload": True},
            {"name": "plain", "gguf": rerank, "context_size": 1024, "preload": True},  # the control: no --reranking
        ]
    )
    assert daemon.model("rerank")["state"] == "ready" and daemon.model("plain")["state"] == "ready"

    answer = json.loads(ask_server(engine, daemon, "rerank", "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS}))
    assert answer["object"] == "list" and answer["model"] == "rerank"
    results = answer["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCUMENTS)))
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True), "best first"
    # softmax over the head's two labels: P("yes"). Near 1/2 with random weights, but never a raw hidden value.
    assert all(0 < s < 1 for s in scores), scores
    assert len(set(scores)) == len(DOCUMENTS), "each document gets its own score"
    assert answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"] > 0

    # The same scores again, on every route, in the Jina (documents) and TEI (texts) shapes; top_n keeps the best.
    again = json.loads(ask_server(engine, daemon, "rerank", "/rerank", {"query": QUERY, "documents": DOCUMENTS}))
    assert again["results"] == results
    best = json.loads(
        ask_server(engine, daemon, "rerank", "/v1/reranking", {"query": QUERY, "documents": DOCUMENTS, "top_n": 2})
    )
    assert best["results"] == results[:2]
    tei = json.loads(ask_server(engine, daemon, "rerank", "/reranking", {"query": QUERY, "texts": DOCUMENTS}))
    assert [(r["index"], r["score"]) for r in tei] == [(r["index"], r["relevance_score"]) for r in results]
    # A score belongs to the (query, document) pair, not to the document's place in the list.
    backwards = DOCUMENTS[::-1]
    reordered = json.loads(ask_server(engine, daemon, "rerank", "/v1/rerank", {"query": QUERY, "documents": backwards}))
    by_text = {DOCUMENTS[r["index"]]: r["relevance_score"] for r in results}
    assert {backwards[r["index"]]: r["relevance_score"] for r in reordered["results"]} == by_text

    # Through the proxy, routed by model: the same answers, on every spelling.
    proxy = daemon.proxy_url.removesuffix("/v1")
    for path in ("/v1/rerank", "/rerank", "/v1/reranking"):
        proxied = requests.post(
            proxy + path, json={"model": "rerank", "query": QUERY, "documents": DOCUMENTS}, timeout=60
        )
        assert proxied.status_code == 200 and proxied.json()["results"] == results, (path, proxied.text)

    # Started without --reranking the same file serves chat, and refuses to rerank.
    status, body = call_server(engine, daemon, "plain", "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS})
    assert status == 501 and b"Start it with `--reranking`" in body, body
    assert daemon.chat("plain").status_code == 200


def test_required_tool_call_and_its_result_round_trip_through_chat_completions(start_daemon, engine, generated):
    daemon = start_daemon([{"name": "tools", "gguf": str(generated["tools"]), "context_size": 2048, "preload": True}])
    url = f"{daemon.proxy_url}/chat/completions"
    request = {"model": "tools", "messages": ASK, "tools": OPENAI_TOOLS, "max_tokens": 200}

    reply = requests.post(url, json={**request, "tool_choice": "required"}, timeout=120)
    assert reply.status_code == 200, reply.text
    [choice] = reply.json()["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["role"] == "assistant" and not choice["message"]["content"]
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) in CITIES

    # The call and its result as history: the template renders both, and the model ends its turn.
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature": 21}'},
    ]
    answer = requests.post(url, json={**request, "messages": history}, timeout=120)
    assert answer.status_code == 200, answer.text
    [choice] = answer.json()["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": ""}
    assert answer.json()["usage"]["prompt_tokens"] > reply.json()["usage"]["prompt_tokens"]

    # The control: where a call is not required (auto), the same question gets no call; the grammar made it.
    auto = requests.post(url, json={**request, "tool_choice": "auto"}, timeout=120).json()
    assert auto["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in auto["choices"][0]["message"]

    # Streamed, the call comes as deltas that add up to one call.
    raw = ask_server(
        engine, daemon, "tools", "/v1/chat/completions", {**request, "tool_choice": "required", "stream": True}
    )
    events = [data for _, data in sse(raw)]
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    parts = [part for d in deltas for part in d.get("tool_calls", [])]
    assert {p["index"] for p in parts} == {0} and parts[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(p["function"].get("arguments", "") for p in parts)) in CITIES
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_anthropic_messages_and_responses_get_a_tool_use(start_daemon, engine, generated):
    daemon = start_daemon([{"name": "tools", "gguf": str(generated["tools"]), "context_size": 2048, "preload": True}])
    request = {"model": "tools", "max_tokens": 200, "messages": ASK, "tools": ANTHROPIC_TOOLS}

    # The tool-use round trip with the official anthropic SDK, through the proxy.
    with anthropic.Anthropic(base_url=daemon.proxy_url.removesuffix("/v1"), api_key="none", max_retries=0) as client:
        message = client.messages.create(**request, tool_choice={"type": "any"})
        assert (message.type, message.role, message.stop_reason) == ("message", "assistant", "tool_use")
        [use] = message.content
        assert use.type == "tool_use" and use.name == "get_weather" and use.id
        assert use.input in CITIES
        assert message.usage.output_tokens > 0
        # The tool_use and a tool_result as history: accepted, and the turn ends.
        history = [
            *ASK,
            {"role": "assistant", "content": [use.model_dump()]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 degrees"}]},
        ]
        answer = client.messages.create(**{**request, "messages": history})
        assert (answer.type, answer.stop_reason, answer.content) == ("message", "end_turn", [])

    # Streamed: Anthropic's events, the call's input as JSON deltas.
    raw = ask_server(
        engine, daemon, "tools", "/v1/messages", {**request, "tool_choice": {"type": "any"}, "stream": True}
    )
    events = sse(raw)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}
    assert events[1][1]["content_block"]["type"] == "tool_use"
    assert events[1][1]["content_block"]["name"] == "get_weather"
    assert json.loads("".join(data["delta"]["partial_json"] for _, data in events[2:-3])) in CITIES
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"

    # OpenAI's Responses API: a function_call output item.
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
    body = {"model": "tools", "input": ASK[0]["content"], "tools": tools, "tool_choice": "required"}
    response = json.loads(ask_server(engine, daemon, "tools", "/v1/responses", {**body, "max_output_tokens": 200}))
    assert response["status"] == "completed"
    [item] = response["output"]
    assert (item["type"], item["name"]) == ("function_call", "get_weather")
    assert json.loads(item["arguments"]) in CITIES
