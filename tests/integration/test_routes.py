"""Every model-addressed route through the proxy, on real llama-server containers, with the official SDKs.

One daemon serves the module (a generated model, preloaded, with an alias and a default model);
the tests that need other settings start their own.
"""

from __future__ import annotations

import concurrent.futures
import re

import anthropic
import openai
import pytest
import requests

from .conftest import ask_server

KEY = "sk-local-routes-0123456789abcdef0123456789abcdef"
TINY = {"name": "tiny", "gguf": "tiny.gguf", "preload": True, "aliases": ["claude-tiny"]}
CODER = {"name": "coder", "gguf": "coder.gguf"}  # with fill-in-the-middle tokens: llama-server serves /infill


@pytest.fixture(scope="module")
def daemon(start_module_daemon):
    """A daemon shared by this module's read-only tests: keys on, tiny preloaded and the default model."""
    return start_module_daemon([TINY, CODER], api_keys=[KEY], list_aliases=True, top={"default_model": "coder"})


def base(daemon) -> str:
    return daemon.proxy_url.removesuffix("/v1")


def post(daemon, path: str, body: dict, **headers) -> requests.Response:
    return requests.post(
        base(daemon) + path, json=body, headers={"Authorization": f"Bearer {KEY}", **headers}, timeout=120
    )


# -- Anthropic Messages ------------------------------------------------------------------------------------


def claude(daemon, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base(daemon), api_key=key, max_retries=0)


def test_anthropic_messages_with_the_official_sdk_streaming_and_not(daemon):
    with claude(daemon) as client:
        message = client.messages.create(
            model="claude-tiny", max_tokens=8, messages=[{"role": "user", "content": "hello"}]
        )
        assert message.type == "message" and message.role == "assistant"
        assert message.stop_reason in ("end_turn", "max_tokens") and message.usage.output_tokens > 0
        assert all(block.type == "text" for block in message.content)
        with client.messages.stream(model="tiny", max_tokens=8, messages=[{"role": "user", "content": "hi"}]) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_message()
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds, kinds
        assert final.stop_reason in ("end_turn", "max_tokens")


def test_anthropic_token_count_with_the_official_sdk(daemon):
    with claude(daemon) as client:
        counted = client.messages.count_tokens(model="tiny", messages=[{"role": "user", "content": "hello world"}])
    assert counted.input_tokens > 0


def test_a_wrong_key_gets_anthropics_401_shape(daemon):
    wrong = claude(daemon, key="sk-wrong-0123456789abcdef0123456789abcdef")
    with wrong, pytest.raises(anthropic.AuthenticationError) as caught:
        wrong.messages.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    body = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert "API key" in body["error"]["message"]
    # the key as Anthropic clients send it is accepted, and errors on these routes keep Anthropic's shape
    unknown = post(daemon, "/v1/messages", {"model": "nope", "max_tokens": 4, "messages": []}, **{"x-api-key": KEY})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"


# -- OpenAI Responses --------------------------------------------------------------------------------------


def first_seen(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def event_names(raw: bytes) -> list[str]:
    return re.findall(r"^event: (\S+)", raw.decode(), flags=re.M)


def test_openai_responses_with_the_official_sdk_streaming_and_not(daemon, engine):
    with openai.OpenAI(base_url=daemon.proxy_url, api_key=KEY, max_retries=0) as client:
        answer = client.responses.create(model="tiny", input="hello", max_output_tokens=8)
        assert answer.status == "completed" and answer.output and answer.usage.output_tokens > 0
        with client.responses.create(model="tiny", input="hi", max_output_tokens=8, stream=True) as events:
            streamed = [event.type for event in events]
    assert streamed[0] == "response.created" and streamed[-1] == "response.completed"
    direct = event_names(
        ask_server(
            engine,
            daemon,
            "tiny",
            "/v1/responses",
            {"model": "tiny", "input": "hi", "max_output_tokens": 8, "stream": True},
        )
    )
    # The same kinds of events, first seen in the same order. How many text deltas there are depends on the tokens
    # sampled, and llama-server itself now and then sends response.created again mid-stream (its own quirk).
    assert first_seen(streamed) == first_seen(direct) and streamed.count("response.completed") == 1, (streamed, direct)


# -- llama-server's own routes, by model and by default_model ---------------------------------------------------


@pytest.mark.parametrize("named", [True, False], ids=["by-model", "by-default-model"])
def test_infill_and_tokenize_are_routed_by_model_or_to_the_default_model(daemon, named):
    model = {"model": "coder"} if named else {}
    tokens = post(daemon, "/tokenize", {**model, "content": "hello world"})
    assert tokens.status_code == 200 and tokens.json()["tokens"]
    text = post(daemon, "/detokenize", {**model, "tokens": tokens.json()["tokens"]})
    assert text.status_code == 200 and "hello" in text.json()["content"]
    infill = post(daemon, "/infill", {**model, "input_prefix": "def f(", "input_suffix": "):", "n_predict": 4})
    assert infill.status_code == 200 and "content" in infill.json()


def test_a_request_without_a_model_and_no_default_model_gets_a_clear_400(start_daemon):
    daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf"}])
    refused = requests.post(base(daemon) + "/tokenize", json={"content": "hi"}, timeout=30)
    assert refused.status_code == 400 and "default_model" in refused.json()["error"]["message"]


# -- the model list and Ollama's detection ------------------------------------------------------------------


def test_the_model_list_has_context_length_and_lists_aliases_without_loading_anything(daemon):
    listed = requests.get(daemon.proxy_url + "/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    by_id = {entry["id"]: entry for entry in listed["data"]}
    assert by_id["tiny"]["context_length"] == 256 and by_id["claude-tiny"]["meta"]["alias_of"] == "tiny"
    assert by_id["tiny"]["meta"] == {
        "backend": "llamacpp",
        "state": "ready",
        "aliases": ["claude-tiny"],
        "alias_of": None,
    }


def test_ollama_clients_detect_the_proxy(daemon):
    root = requests.get(base(daemon) + "/", timeout=30)
    assert root.status_code == 200 and root.text == "Ollama is running"
    version = requests.get(base(daemon) + "/api/version", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert re.fullmatch(r"\d+\.\d+\.\d+", version.json()["version"])


# -- per-model limits and filters ----------------------------------------------------------------------------


def test_max_concurrent_answers_429_with_retry_after_for_exactly_the_excess(start_daemon):
    daemon = start_daemon(
        [
            {
                "name": "slow",
                "gguf": "slow.gguf",
                "preload": True,
                "max_concurrent": 2,
                "context_size": 512,
                "parallel": 2,
            }
        ]
    )
    body = {
        "model": "slow",
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "tell a long story"}],
        "ignore_eos": True,
    }
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(lambda _: requests.post(daemon.proxy_url + "/chat/completions", json=body, timeout=120), range(6))
        )
    refused = [a for a in answers if a.status_code == 429]
    assert len(refused) == 4 and sum(a.status_code == 200 for a in answers) == 2
    assert all(a.headers["Retry-After"].isdigit() and a.json()["error"]["code"] == "concurrency_limit" for a in refused)


def test_filters_strip_and_force_fields_as_llama_server_sees_them(start_daemon):
    filters = {"strip_params": ["logprobs", "top_logprobs"], "set_params": {"max_tokens": 1}}
    daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf", "preload": True, "filters": filters}])
    answer = daemon.chat("tiny", max_tokens=12, logprobs=True, top_logprobs=2).json()
    assert answer["usage"]["completion_tokens"] == 1  # llama-server generated what the forced field says
    assert answer["choices"][0].get("logprobs") is None  # and never saw the stripped ones
