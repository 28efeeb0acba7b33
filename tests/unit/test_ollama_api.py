"""Ollama's HTTP API as localllm uses it, against a small in-process server; and the pure readings of /api/show.

The fake answers as Ollama's source does (server/routes.go); the estimates are checked against GraphSize's
KV cache (fs/ggml/ggml.go), written out by hand for each case.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from supervisor.core.errors import ModelStartFailed, OllamaFailure, QueueFull
from supervisor.runtime.ollama_api import (
    PULL_SILENCE,
    OllamaApi,
    capabilities,
    context_from_show,
    embedding_only,
    estimate_from_show,
    kv_cache_bytes,
    loaded_context,
    training_context,
)

Handler = Callable[[web.Request, dict], Awaitable[web.StreamResponse]]


class FakeOllama:
    """Answers each path with the handler a test set; records every request as (path, body)."""

    def __init__(self, **handlers: Handler):
        self.handlers = {"/" + name.replace("_", "/"): handler for name, handler in handlers.items()}
        self.requests: list[tuple[str, dict]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else {}
        self.requests.append((request.path, body))
        return await self.handlers[request.path](request, body)

    def bodies(self, path: str) -> list[dict]:
        return [body for seen, body in self.requests if seen == path]


def run(fake: FakeOllama, scenario: Callable[[OllamaApi], Awaitable]):
    async def main():
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", fake.handle)
        async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
            return await scenario(OllamaApi(session, str(server.make_url("")).rstrip("/"), "m"))

    return asyncio.run(main())


def answer(body: dict | None = None, status: int = 200, **headers: str) -> Handler:
    async def handler(_request: web.Request, _body: dict) -> web.Response:
        return web.json_response(body if body is not None else {}, status=status, headers=headers)

    return handler


def ps_listing(*names: str) -> dict:
    return {
        "models": [{"name": name, "model": name, "size": 10, "size_vram": 0, "context_length": 4096} for name in names]
    }


# -- loading and unloading


def test_load_sends_num_ctx_and_keeps_the_model_loaded():
    fake = FakeOllama(api_generate=answer({"model": "tiny:1b", "done": True, "done_reason": "load"}))
    run(fake, lambda api: api.load("tiny:1b", 8192))
    assert fake.requests == [
        (
            "/api/generate",
            {"model": "tiny:1b", "keep_alive": -1, "options": {"num_ctx": 8192}, "prompt": "", "stream": False},
        )
    ]


def test_load_without_a_context_leaves_num_ctx_to_the_modelfile():
    fake = FakeOllama(api_generate=answer({"done": True}))
    run(fake, lambda api: api.load("tiny:1b", None))
    [body] = fake.bodies("/api/generate")
    assert "options" not in body and body["keep_alive"] == -1


def test_an_embedding_model_loads_through_embed_with_no_input():
    fake = FakeOllama(api_embed=answer({"model": "embed:1b", "embeddings": []}))
    run(fake, lambda api: api.load("embed:1b", 2048, embedding=True))
    assert fake.requests == [("/api/embed", {"model": "embed:1b", "keep_alive": -1, "options": {"num_ctx": 2048}})]


def test_a_generate_refused_for_an_embedding_model_is_a_start_failure():
    fake = FakeOllama(api_generate=answer({"error": '"embed:1b" does not support generate'}, status=400))
    with pytest.raises(ModelStartFailed, match="does not support generate"):
        run(fake, lambda api: api.load("embed:1b", None))


@pytest.mark.parametrize("headers, retry_after", [({}, 5), ({"Retry-After": "7"}, 7)])
def test_a_full_ollama_queue_is_an_overload_to_retry_not_a_start_failure(headers, retry_after):
    busy = {"error": "server busy, please try again.  maximum pending requests exceeded"}
    fake = FakeOllama(api_generate=answer(busy, status=503, **headers))
    with pytest.raises(QueueFull) as caught:
        run(fake, lambda api: api.load("tiny:1b", 4096))
    assert caught.value.retry_after == retry_after and caught.value.http_status == 503
    assert "server busy" in caught.value.message


def test_unload_sends_keep_alive_zero_and_takes_a_404_as_nothing_to_unload():
    fake = FakeOllama(api_generate=answer({"error": "model 'gone:1b' not found"}, status=404))
    run(fake, lambda api: api.unload("gone:1b"))
    assert fake.bodies("/api/generate") == [{"model": "gone:1b", "prompt": "", "keep_alive": 0, "stream": False}]


def test_unload_refused_otherwise_is_an_ollama_failure_not_a_failed_start():
    fake = FakeOllama(api_generate=answer({"error": "boom"}, status=500))
    with pytest.raises(OllamaFailure, match="boom") as caught:
        run(fake, lambda api: api.unload("tiny:1b"))
    assert not isinstance(caught.value, ModelStartFailed)
    assert (caught.value.code, caught.value.http_status, caught.value.model) == ("ollama_error", 502, "m")
    assert caught.value.message == "Ollama /api/generate: boom"


def test_the_unload_of_a_model_still_loading_waits_as_long_as_it_is_told():
    """expireRunner takes the loading runner's lock: the answer comes once that load ends."""
    release = asyncio.Event()

    async def generate(_request: web.Request, _body: dict) -> web.Response:
        await release.wait()
        return web.json_response({"done": True, "done_reason": "unload"})

    async def scenario(api):
        with pytest.raises(OllamaFailure, match="did not answer"):
            await api.unload("tiny:1b", timeout=0.2)
        asyncio.get_running_loop().call_later(0.3, release.set)
        await api.unload("tiny:1b", timeout=5)

    run(FakeOllama(api_generate=generate), scenario)


def listed_for(calls: int, name: str = "tiny:1b") -> Handler:
    """/api/ps that lists ``name`` for the first ``calls`` requests, then nothing: a queued unload that completes."""
    seen = []

    async def handler(_request: web.Request, _body: dict) -> web.Response:
        seen.append(1)
        return web.json_response(ps_listing(name) if len(seen) <= calls else ps_listing())

    return handler


def test_wait_gone_polls_ps_until_the_model_is_no_longer_listed():
    fake = FakeOllama(api_ps=listed_for(3, "Tiny:1B"))  # Ollama's own spelling may differ in case
    assert run(fake, lambda api: api.wait_gone("tiny:1b", timeout=5)) is True
    assert len(fake.bodies("/api/ps")) == 4


def test_wait_gone_is_false_when_the_model_stays():
    fake = FakeOllama(api_ps=listed_for(10_000))

    async def scenario(api):
        started = asyncio.get_running_loop().time()
        gone = await api.wait_gone("tiny:1b", timeout=0.5)
        return gone, asyncio.get_running_loop().time() - started

    gone, took = run(fake, scenario)
    assert gone is False and 0.5 <= took < 1.5
    assert 2 <= len(fake.bodies("/api/ps")) <= 6  # 0.1 s, growing to 0.5 s: no busy loop


def blocked_ps(release: asyncio.Event, body: dict) -> Handler:
    """/api/ps while Ollama loads another model: no answer until the load ends."""

    async def handler(_request: web.Request, _body: dict) -> web.Response:
        await release.wait()
        return web.json_response(body)

    return handler


def test_wait_gone_is_false_when_ps_stays_blocked_past_the_timeout():
    release = asyncio.Event()

    async def scenario(api):
        try:
            return await api.wait_gone("tiny:1b", timeout=0.3)
        finally:
            release.set()  # lets the server's handler end, so the server can close

    assert run(FakeOllama(api_ps=blocked_ps(release, ps_listing())), scenario) is False


def test_loaded_waits_out_a_load_elsewhere_for_as_long_as_it_is_told():
    release = asyncio.Event()

    async def scenario(api):
        with pytest.raises(OllamaFailure, match="did not answer"):
            await api.loaded(timeout=0.2)
        asyncio.get_running_loop().call_later(0.3, release.set)
        return await api.loaded()  # the default outlasts a load

    listed = run(FakeOllama(api_ps=blocked_ps(release, ps_listing("tiny:1b"))), scenario)
    assert list(listed) == ["tiny:1b"] and loaded_context(listed["tiny:1b"]) == 4096


# -- pulling


def pull_with_silence(seconds: float) -> Handler:
    """A pull that goes quiet for ``seconds`` ("verifying sha256 digest" on a big blob), then succeeds."""

    async def handler(request: web.Request, _body: dict) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await response.write(b'{"status": "pulling manifest"}\n')
        await response.write(b'{"status": "verifying sha256 digest"}\n')
        await asyncio.sleep(seconds)
        await response.write(b'{"status": "success"}\n')
        await response.write_eof()
        return response

    return handler


def test_pull_reports_progress_and_allows_a_silent_phase_up_to_its_limit():
    fake = FakeOllama(api_pull=pull_with_silence(0.3))
    lines = []
    run(fake, lambda api: api.pull("tiny:1b", lines.append, silence=2))
    assert [line["status"] for line in lines] == ["pulling manifest", "verifying sha256 digest", "success"]
    assert fake.bodies("/api/pull") == [{"model": "tiny:1b", "stream": True}]


def test_pull_silent_for_longer_than_its_limit_breaks_off():
    fake = FakeOllama(api_pull=pull_with_silence(0.5))
    with pytest.raises(ModelStartFailed, match="broke off"):
        run(fake, lambda api: api.pull("tiny:1b", lambda line: None, silence=0.1))


def test_the_default_pull_silence_outlasts_a_digest_check():
    assert PULL_SILENCE >= 30 * 60


def test_has_matches_names_as_ollama_does():
    fake = FakeOllama(api_tags=answer({"models": [{"name": "Tiny-A:1B"}, {"name": "myhost:5000/team/x:1"}]}))

    async def scenario(api):
        return [
            await api.has(name) for name in ("registry.ollama.ai/library/tiny-a:1b", "team/x:1", "myhost:5000/team/x:1")
        ]

    assert run(fake, scenario) == [True, False, True]


@pytest.mark.parametrize(
    "call, handlers, problem",
    [
        (lambda api: api.has("tiny:1b"), {"api_tags": answer({"error": "boom"}, status=500)}, "/api/tags: HTTP 500"),
        (lambda api: api.has("tiny:1b"), {"api_tags": answer([1, 2])}, "/api/tags: unexpected answer"),
        (lambda api: api.loaded(), {"api_ps": answer({}, status=500)}, "/api/ps: HTTP 500"),
        (lambda api: api.wait_gone("tiny:1b", 5), {"api_ps": answer({}, status=500)}, "/api/ps: HTTP 500"),
        (
            lambda api: api.show("tiny:1b"),
            {"api_show": answer({"error": "model 'tiny:1b' not found"}, status=404)},
            "/api/show: model 'tiny:1b' not found",
        ),
    ],
    ids=["tags", "tags-not-an-object", "ps", "wait-gone", "show"],
)
def test_a_list_or_show_that_fails_is_an_ollama_failure_not_a_failed_start(call, handlers, problem):
    with pytest.raises(OllamaFailure, match=problem) as caught:
        run(FakeOllama(**handlers), call)
    assert not isinstance(caught.value, ModelStartFailed)


def test_a_call_ollama_does_not_answer_is_an_ollama_failure():
    async def main():
        async with aiohttp.ClientSession() as session:
            api = OllamaApi(session, "http://127.0.0.1:9", "m")  # discard: nothing listens
            with pytest.raises(OllamaFailure, match="/api/ps did not answer"):
                await api.loaded(timeout=2)
            with pytest.raises(OllamaFailure, match="/api/generate did not answer"):
                await api.unload("tiny:1b", timeout=2)
            with pytest.raises(ModelStartFailed, match="failed to start: Ollama /api/generate did not answer"):
                await api.load("tiny:1b", 4096)  # a load is a start

    asyncio.run(main())


def test_a_load_that_fails_stays_a_start_failure_with_its_message():
    fake = FakeOllama(api_generate=answer({"error": "out of memory"}, status=500))
    with pytest.raises(ModelStartFailed) as caught:
        run(fake, lambda api: api.load("tiny:1b", 4096))
    assert caught.value.message == "model 'm' failed to start: Ollama /api/generate: out of memory"


def test_a_pull_ollama_refuses_is_a_start_failure():
    fake = FakeOllama(api_pull=answer({"error": "pull model manifest: file does not exist"}, status=500))
    with pytest.raises(ModelStartFailed, match="could not pull 'nope:1b'"):
        run(fake, lambda api: api.pull("nope:1b", lambda line: None))


# -- /api/show


def test_show_asks_again_verbosely_when_ollama_left_the_head_counts_out():
    """routes.go getModelData: without verbose every array in model_info is null."""
    full = {"general.architecture": "hybrid", "hybrid.block_count": 2, "hybrid.attention.head_count": [8, 0]}

    async def show(_request: web.Request, body: dict) -> web.Response:
        info = full if body.get("verbose") else {**full, "hybrid.attention.head_count": None}
        return web.json_response({"details": {}, "model_info": info})

    fake = FakeOllama(api_show=show)
    assert run(fake, lambda api: api.show("h:1"))["model_info"] == full
    assert fake.bodies("/api/show") == [{"model": "h:1"}, {"model": "h:1", "verbose": True}]


def test_show_asks_once_when_nothing_was_left_out():
    fake = FakeOllama(api_show=answer({"details": {}, "model_info": QWEN3_4B["model_info"]}))
    run(fake, lambda api: api.show("qwen3:4b"))
    assert fake.bodies("/api/show") == [{"model": "qwen3:4b"}]


QWEN3_4B = {  # key_length 128 where embedding / heads is 80: the old estimate was 80/128 of the truth
    "details": {"parameter_size": "4.0B", "quantization_level": "Q4_K_M", "family": "qwen3"},
    "capabilities": ["completion", "tools", "thinking"],
    "parameters": 'repeat_penalty                 1\nstop                           "<|im_start|>"\n'
    "num_ctx                        8192\ntemperature                    0.6",
    "model_info": {
        "general.architecture": "qwen3",
        "general.parameter_count": 4_022_468_096,
        "qwen3.block_count": 36,
        "qwen3.context_length": 40960,
        "qwen3.embedding_length": 2560,
        "qwen3.attention.head_count": 32,
        "qwen3.attention.head_count_kv": 8,
        "qwen3.attention.key_length": 128,
        "qwen3.attention.value_length": 128,
        "tokenizer.ggml.tokens": None,
    },
}
QWEN3_WEIGHTS = int(4_022_468_096 * 4.85 / 8)


def qwen3_kv(cells: int, per_element: float = 2) -> int:
    return int(36 * cells * (128 + 128) * 8 * per_element)


def test_estimate_uses_key_and_value_length():
    assert estimate_from_show(QWEN3_4B, 4096) == QWEN3_WEIGHTS + qwen3_kv(4096)
    assert qwen3_kv(4096) == 36 * 4096 * 2 * 128 * 8 * 2  # not 80 wide, as embedding / heads says


def test_estimate_counts_every_parallel_slot():
    """Ollama runs llama-server with -c num_ctx * num_parallel (llm/llama_server.go)."""
    assert estimate_from_show(QWEN3_4B, 4096, parallel=4) == QWEN3_WEIGHTS + qwen3_kv(4 * 4096)
    assert estimate_from_show(QWEN3_4B, 4096, parallel=4) - QWEN3_WEIGHTS == 4 * qwen3_kv(4096)


@pytest.mark.parametrize("cache_type, per_element", [("f16", 2), ("q8_0", 1), ("Q4_0", 0.5), ("f32", 4), ("bf16", 2)])
def test_estimate_uses_the_kv_cache_types_bytes(cache_type, per_element):
    assert estimate_from_show(QWEN3_4B, 4096, cache_type=cache_type) == QWEN3_WEIGHTS + qwen3_kv(4096, per_element)


def test_estimate_caps_the_context_at_the_training_context():
    """llm/server.go: a num_ctx above <arch>.context_length is cut to it."""
    assert estimate_from_show(QWEN3_4B, 100_000) == estimate_from_show(QWEN3_4B, 40960)


def test_estimate_without_key_length_divides_the_embedding_by_the_fewest_heads():
    info = {k: v for k, v in QWEN3_4B["model_info"].items() if "_length" not in k or "embedding" in k}
    assert kv_cache_bytes(info, 4096, 1) == 36 * 4096 * (80 + 80) * 8 * 2


def hybrid(**fields) -> dict:
    """A hybrid model (granite-4-like): attention in some layers, recurrent (SSM) state in the others."""
    info = {
        "general.architecture": "hy",
        "general.parameter_count": 1_000_000_000,
        "hy.block_count": 4,
        "hy.embedding_length": 1024,
        "hy.attention.head_count": [16, 0, 16, 0],
        "hy.attention.head_count_kv": [4, 0, 4, 0],
        "hy.ssm.conv_kernel": 4,
        "hy.ssm.state_size": 128,
        "hy.ssm.inner_size": 2048,
        "hy.ssm.group_count": 1,
        **fields,
    }
    return {"details": {"quantization_level": "Q8_0"}, "model_info": info}


def test_estimate_reads_array_valued_head_counts_per_layer():
    # two attention layers: head width 1024 / min(16, 0, 16, 0) = 1024 / 0 -> 0 as Ollama has it, so key_length counts
    ssm = ((4 - 1) * (2048 + 2 * 1 * 128) + 128 * 2048) * 4
    with_lengths = hybrid(**{"hy.attention.key_length": 64, "hy.attention.value_length": 64})
    assert kv_cache_bytes(with_lengths["model_info"], 1000, 2) == 2 * (2000 * 128 * 4 * 2) + 2 * ssm
    assert estimate_from_show(with_lengths, 1000, 2) == int(1e9 * 8.5 / 8) + 2 * (2000 * 128 * 4 * 2) + 2 * ssm


def test_a_short_head_count_array_fills_the_remaining_layers_as_ollama_does():
    """KV.HeadCount: layers past the array's end take its only element, else 1."""
    info = {
        "general.architecture": "a",
        "a.block_count": 3,
        "a.embedding_length": 512,
        "a.attention.head_count": [8],
        "a.attention.head_count_kv": [2, 4],
    }
    assert kv_cache_bytes(info, 100, 1) == 100 * (64 + 64) * (2 + 4 + 1) * 2


@pytest.mark.parametrize("elided", [None, []])
@pytest.mark.parametrize("key", ["hy.attention.head_count", "hy.attention.head_count_kv"])
def test_an_elided_head_count_makes_no_estimate_and_no_crash(key, elided):
    assert estimate_from_show(hybrid(**{key: elided}), 4096) is None


def test_estimate_without_layers_is_the_weights_and_without_a_quantization_none():
    no_info = {"details": {"parameter_size": "7B", "quantization_level": "Q4_K_M"}}
    assert estimate_from_show(no_info, 4096) == int(7e9 * 4.85 / 8)
    assert estimate_from_show({"details": {"parameter_size": "7B", "quantization_level": "Q9"}}, 4096) is None
    assert estimate_from_show({"model_info": None, "details": None}, 4096) is None


# -- context and capabilities


def test_context_from_the_modelfiles_parameters_and_the_training_context():
    assert context_from_show(QWEN3_4B) == 8192 and training_context(QWEN3_4B) == 40960
    assert context_from_show({"parameters": 'stop "num_ctx 5"\ntemperature 0.6'}) is None
    assert context_from_show({}) is None and training_context({}) is None


def test_capabilities_and_what_loads_through_embed():
    assert capabilities(QWEN3_4B) == {"completion", "tools", "thinking"} and not embedding_only(QWEN3_4B)
    assert capabilities({}) == {"completion"}  # an Ollama too old to say
    assert embedding_only({"capabilities": ["embedding"]})
    assert not embedding_only({"capabilities": ["embedding", "completion"]})
