"""The Ollama STAND-IN (``ollama_standin/server.py``) in a real container on the real engine.

No Ollama image is reachable from the test machines, so the Ollama backend is tested against a
stand-in. These tests hold the stand-in to the shapes of Ollama's documented API (docs/api.md and
the OpenAI-compatible ``/v1``) and to the behaviours read in Ollama's source, so that the
backend's tests can trust it. One container, with its store in a host directory, serves the first
tests; they run in file order and build on each other (pull, then list, show, load, unload, chat,
restart). Two more short-lived containers check the load limit with a GPU and a start that fails.
Then each behaviour taken from Ollama's source gets a test of its own, each with a fresh container
whose settings choose that behaviour (``fresh``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import docker
import openai
import pytest
import requests

from .conftest import RUN_ID, TEST_RUN_LABEL, free_tcp_port, poll_for
from .ollama_standin import STANDIN_IMAGE, ensure_standin_image

KIND_LABEL = "io.localllm.kind"
PULL_SECONDS = 0.5
REGISTRY = {
    "tiny-a:1b": {
        "size": 600_000_000,
        "parameter_size": "1.1B",
        "quantization_level": "Q4_0",
        "block_count": 22,
        "embedding_length": 2048,
        "head_count": 32,
        "head_count_kv": 4,
        "context_length": 8192,
    },
    "tiny-b:1b": {"size": 300_000_000, "parameter_size": "0.5B", "quantization_level": "Q8_0"},
}
CANNED = "Hello from the Ollama stand-in: no model ran, these are canned tokens."
GO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)$")
NUMBERS = itertools.count()


def kv_bytes(layers: int, width: int, heads: int, kv_heads: int, context: int) -> int:
    """The f16 KV cache the stand-in adds to a loaded model's size (K and V, 2 bytes each)."""
    return 2 * layers * (width * kv_heads // heads) * context * 2


@dataclass
class Standin:
    """A stand-in container and plain HTTP helpers that close every response."""

    container: docker.models.containers.Container
    url: str
    store: Path

    def get(self, path: str) -> tuple[int, dict]:
        with requests.get(self.url + path, timeout=30) as response:
            return response.status_code, response.json()

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        with requests.post(self.url + path, json=body, timeout=30) as response:
            return response.status_code, response.json()

    def lines(self, path: str, body: dict) -> tuple[int, str, list[dict]]:
        """A streamed NDJSON answer: status, content type, the objects in order."""
        with requests.post(self.url + path, json=body, stream=True, timeout=30) as response:
            return (
                response.status_code,
                response.headers.get("Content-Type", ""),
                [json.loads(line) for line in response.iter_lines() if line],
            )

    def ps(self) -> list[dict]:
        return self.get("/api/ps")[1]["models"]

    def logs(self) -> str:
        return self.container.logs().decode(errors="replace")


def alive(url: str) -> bool:
    try:
        with requests.get(url + "/api/version", timeout=1) as response:
            return response.status_code == 200
    except requests.ConnectionError:
        return False


def run_standin(client: docker.DockerClient, store: Path, env: dict | None = None, wait: bool = True) -> Standin:
    """Start the stand-in as localllm's backend does: host network, 127.0.0.1, the store mounted at /root/.ollama."""
    port = free_tcp_port()
    environment = {
        "OLLAMA_HOST": f"127.0.0.1:{port}",
        "OLLAMA_MODELS": "/root/.ollama/models",
        "STANDIN_REGISTRY": json.dumps(REGISTRY),
        "STANDIN_PULL_SECONDS": str(PULL_SECONDS),
        "STANDIN_LOAD_SECONDS": "0.1",
        "STANDIN_TOKEN_SECONDS": "0.005",
        **(env or {}),
    }
    container = client.containers.run(
        STANDIN_IMAGE,
        ["serve"],
        detach=True,
        network_mode="host",
        environment=environment,
        name=f"localllm-ollama-standin-{RUN_ID}-{next(NUMBERS)}",
        labels={TEST_RUN_LABEL: RUN_ID, KIND_LABEL: "ollama-standin"},
        volumes={str(store): {"bind": "/root/.ollama", "mode": "rw"}},
    )
    standin = Standin(container, f"http://127.0.0.1:{port}", store)
    if wait:
        wait_until_serving(standin)
    return standin


def wait_until_serving(standin: Standin) -> None:
    def up() -> bool:
        standin.container.reload()
        return standin.container.status == "exited" or alive(standin.url)

    poll_for(up, 20, "the stand-in to answer /api/version")
    assert standin.container.status != "exited", f"the stand-in exited:\n{standin.logs()}"


def remove(container) -> None:
    with contextlib.suppress(docker.errors.NotFound):
        container.remove(force=True)


@pytest.fixture(scope="module")
def client(engine):
    """The session's Docker client (conftest); this module's stand-in containers go when it ends."""
    yield engine
    for container in engine.containers.list(
        all=True, ignore_removed=True, filters={"label": [f"{TEST_RUN_LABEL}={RUN_ID}", f"{KIND_LABEL}=ollama-standin"]}
    ):
        remove(container)


@pytest.fixture(scope="module")
def image(client) -> str:
    started = time.monotonic()
    tag = ensure_standin_image(client)
    print(f"\nollama stand-in image ready in {time.monotonic() - started:.1f}s")
    return tag


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ollama-store")


@pytest.fixture(scope="module")
def standin(client, image, store):
    standin = run_standin(client, store, {"OLLAMA_KEEP_ALIVE": "5m"})
    yield standin
    remove(standin.container)


def test_version_root_and_an_unknown_route(standin):
    assert standin.get("/api/version") == (200, {"version": "0.0.0-standin"})
    with requests.get(standin.url + "/", timeout=10) as response:
        assert (response.status_code, response.text) == (200, "Ollama is running")
    with requests.get(standin.url + "/api/nothing", timeout=10) as response:
        assert (response.status_code, response.text) == (404, "404 page not found")
    assert "STAND-IN for Ollama" in standin.logs()


def test_pull_streams_progress_and_writes_the_store(standin):
    started = time.monotonic()
    status, content_type, lines = standin.lines("/api/pull", {"model": "tiny-a:1b", "stream": True})
    took = time.monotonic() - started
    assert status == 200 and content_type.startswith("application/x-ndjson")
    assert lines[0] == {"status": "pulling manifest"}
    assert lines[-3:] == [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]
    layers: dict[str, list[dict]] = {}
    for line in lines[1:-3]:
        assert line["status"] == f"pulling {line['digest'][7:19]}" and line["digest"].startswith("sha256:")
        layers.setdefault(line["digest"], []).append(line)
    for progress in layers.values():
        assert "completed" not in progress[0]  # omitted while 0, as Ollama sends it
        completed = [p["completed"] for p in progress[1:]]
        assert completed == sorted(completed) and completed[-1] == progress[0]["total"]
    weights = next(iter(layers.values()))
    assert len(weights) >= 10, "the weights layer reports its progress in steps"
    assert sum(p[0]["total"] for p in layers.values()) == REGISTRY["tiny-a:1b"]["size"]
    assert PULL_SECONDS * 0.8 <= took < PULL_SECONDS + 3
    manifest = standin.store / "models" / "manifests" / "registry.ollama.ai" / "library" / "tiny-a" / "1b"
    assert json.loads(manifest.read_text())["schemaVersion"] == 2
    poll_for(lambda: '"/api/pull"' in standin.logs(), 5, "the request's log line (written once the answer is sent)")


def test_tags_and_v1_models_list_what_the_store_holds(standin):
    status, tags = standin.get("/api/tags")
    assert status == 200 and [m["name"] for m in tags["models"]] == ["tiny-a:1b"]
    entry = tags["models"][0]
    assert set(entry) == {"name", "model", "modified_at", "size", "digest", "details"}
    assert entry["model"] == "tiny-a:1b" and entry["size"] == 600_000_000
    assert re.fullmatch(r"[0-9a-f]{64}", entry["digest"]) and GO_TIME.match(entry["modified_at"])
    assert entry["details"] == {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "1.1B",
        "quantization_level": "Q4_0",
    }
    status, models = standin.get("/v1/models")
    assert status == 200 and models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [("tiny-a:1b", "model", "library")]


def test_pull_of_an_unknown_model_fails_and_the_old_name_field_works(standin):
    status, _, lines = standin.lines("/api/pull", {"model": "nope:1b"})
    assert status == 200  # the stream has started when the manifest turns out missing
    assert lines == [{"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}]
    assert standin.post("/api/pull", {"model": "nope:1b", "stream": False}) == (
        500,
        {"error": "pull model manifest: file does not exist"},
    )
    # Older clients send "name"; without streaming the answer is one object.
    assert standin.post("/api/pull", {"name": "tiny-b:1b", "stream": False}) == (200, {"status": "success"})
    assert sorted(m["name"] for m in standin.get("/api/tags")[1]["models"]) == ["tiny-a:1b", "tiny-b:1b"]


def test_show_reports_details_and_model_info(standin):
    status, show = standin.post("/api/show", {"model": "tiny-a:1b"})
    assert status == 200
    assert {"modelfile", "template", "details", "model_info", "capabilities"} <= set(show)
    assert "parameters" not in show  # empty, so left out (omitempty), as Ollama does
    assert show["capabilities"] == ["completion"]
    assert show["details"]["parameter_size"] == "1.1B" and show["details"]["quantization_level"] == "Q4_0"
    info = show["model_info"]
    assert info["general.architecture"] == "llama" and info["general.parameter_count"] == 1_100_000_000
    assert (
        info["llama.block_count"],
        info["llama.context_length"],
        info["llama.embedding_length"],
        info["llama.attention.head_count"],
        info["llama.attention.head_count_kv"],
    ) == (22, 8192, 2048, 32, 4)
    assert standin.post("/api/show", {"model": "nope:1b"}) == (404, {"error": "model 'nope:1b' not found"})


def test_generate_with_no_prompt_loads_and_ps_lists_the_model(standin):
    status, answer = standin.post(
        "/api/generate",
        {"model": "tiny-a:1b", "prompt": "", "keep_alive": -1, "options": {"num_ctx": 2048}, "stream": False},
    )
    assert status == 200
    assert {k: answer[k] for k in ("model", "response", "done", "done_reason")} == {
        "model": "tiny-a:1b",
        "response": "",
        "done": True,
        "done_reason": "load",
    }
    assert GO_TIME.match(answer["created_at"])
    [loaded] = standin.ps()
    assert loaded["name"] == loaded["model"] == "tiny-a:1b"
    assert loaded["size"] == 600_000_000 + kv_bytes(22, 2048, 32, 4, 2048) and loaded["size_vram"] == 0
    assert loaded["context_length"] == 2048
    tags = standin.get("/api/tags")[1]["models"]
    assert loaded["digest"] == next(m["digest"] for m in tags if m["name"] == "tiny-a:1b")
    assert loaded["details"] == next(m["details"] for m in tags if m["name"] == "tiny-a:1b")
    assert GO_TIME.match(loaded["expires_at"]) and int(loaded["expires_at"][:4]) > 2200  # keep_alive -1: forever
    assert standin.post("/api/generate", {"model": "nope:1b", "prompt": ""}) == (
        404,
        {"error": "model 'nope:1b' not found"},
    )
    assert standin.post("/api/generate", {"model": "tiny-a:1b", "keep_alive": "-1"})[0] == 400  # not a Go duration
    assert "loaded model" in standin.logs()


def test_generate_streams_text_until_num_predict(standin):
    status, content_type, lines = standin.lines(
        "/api/generate", {"model": "tiny-a:1b", "prompt": "hi", "options": {"num_ctx": 2048, "num_predict": 3}}
    )
    assert status == 200 and content_type.startswith("application/x-ndjson")
    assert [line["response"] for line in lines[:-1]] == ["Hello", " from", " the"]
    assert not any(line["done"] for line in lines[:-1])
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "length" and lines[-1]["eval_count"] == 3


def test_generate_with_keep_alive_0_unloads(standin):
    status, answer = standin.post(
        "/api/generate", {"model": "tiny-a:1b", "prompt": "", "keep_alive": 0, "stream": False}
    )
    assert status == 200 and answer["done"] is True and answer["done_reason"] == "unload"
    deadline = time.monotonic() + 5  # the runner goes after STANDIN_UNLOAD_SECONDS (0.5 s by default)
    while standin.ps() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert standin.ps() == []


def test_openai_chat_through_the_sdk_loads_the_model_and_streams_with_usage(standin):
    with openai.OpenAI(base_url=standin.url + "/v1", api_key="ollama", max_retries=0) as sdk:
        chunks = []
        with sdk.chat.completions.create(
            model="tiny-a:1b",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        ) as stream:
            chunks = list(stream)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert content == "Hello from the Ollama stand"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
        assert all(c.object == "chat.completion.chunk" and c.id.startswith("chatcmpl-") for c in chunks)

        whole = sdk.chat.completions.create(model="tiny-a:1b", messages=[{"role": "user", "content": "hi"}])
        assert whole.choices[0].message.content == CANNED and whole.choices[0].finish_reason == "stop"
        assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
        assert whole.system_fingerprint == "fp_ollama"

        with pytest.raises(openai.NotFoundError, match="model 'nope:1b' not found"):
            sdk.chat.completions.create(model="nope:1b", messages=[{"role": "user", "content": "hi"}])
    [loaded] = standin.ps()  # the chat loaded it, with the default context and OLLAMA_KEEP_ALIVE
    assert loaded["name"] == "tiny-a:1b" and loaded["size"] == 600_000_000 + kv_bytes(22, 2048, 32, 4, 2048)
    assert int(loaded["expires_at"][:4]) < 2200


def test_a_request_with_another_num_ctx_reloads_the_model(standin):
    """As in Ollama: runner options that differ (the OpenAI endpoint always asks for the default context) reload."""
    standin.post("/api/generate", {"model": "tiny-a:1b", "keep_alive": -1, "options": {"num_ctx": 4096}})
    assert standin.ps()[0]["size"] == 600_000_000 + kv_bytes(22, 2048, 32, 4, 4096)
    with openai.OpenAI(base_url=standin.url + "/v1", api_key="ollama", max_retries=0) as sdk:
        sdk.chat.completions.create(model="tiny-a:1b", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
    assert standin.ps()[0]["size"] == 600_000_000 + kv_bytes(22, 2048, 32, 4, 2048)
    assert "reloading: runner options changed" in standin.logs()


def test_a_finite_keep_alive_expires(standin):
    status, answer = standin.post("/api/generate", {"model": "tiny-a:1b", "keep_alive": "1s", "stream": False})
    assert status == 200 and answer["done_reason"] == "load"
    assert [m["name"] for m in standin.ps()] == ["tiny-a:1b"]
    poll_for(lambda: standin.ps() == [], 5, "the model to expire")
    assert "keep_alive expired" in standin.logs()


def test_a_restart_keeps_the_store_and_forgets_the_loaded_models(standin):
    standin.post("/api/generate", {"model": "tiny-b:1b", "keep_alive": -1})
    assert [m["name"] for m in standin.ps()] == ["tiny-b:1b"]
    standin.container.restart(timeout=10)
    wait_until_serving(standin)
    assert sorted(m["name"] for m in standin.get("/api/tags")[1]["models"]) == ["tiny-a:1b", "tiny-b:1b"]
    assert standin.ps() == []
    assert "received signal, shutting down" in standin.logs()


def test_max_loaded_models_evicts_and_a_gpu_reports_vram_and_sigterm_exits_0(client, image, store):
    """A second server on the same store (it sees the models pulled above) with one model at a time on a GPU."""
    second = run_standin(
        client,
        store,
        {"OLLAMA_MAX_LOADED_MODELS": "1", "OLLAMA_NUM_PARALLEL": "2", "STANDIN_GPU": "1", "OLLAMA_KEEP_ALIVE": "-1"},
    )
    try:
        for name in ("tiny-a:1b", "tiny-b:1b"):
            assert (
                second.post("/api/generate", {"model": name, "options": {"num_ctx": 2048}})[1]["done_reason"] == "load"
            )
        [loaded] = second.ps()
        assert loaded["name"] == "tiny-b:1b"
        assert loaded["size"] == loaded["size_vram"] == 300_000_000 + kv_bytes(16, 2048, 32, 8, 2048 * 2)
        assert "max loaded models reached" in second.logs()
        started = time.monotonic()
        second.container.stop(timeout=10)
        assert time.monotonic() - started < 5, "SIGTERM ends the stand-in at once"
        second.container.reload()
        assert second.container.attrs["State"]["ExitCode"] == 0
        assert "server stopped" in second.logs()
    finally:
        remove(second.container)


def test_fail_start_exits_1_with_a_message(client, image, store):
    failing = run_standin(client, store, {"STANDIN_FAIL_START": "1"}, wait=False)
    try:
        assert failing.container.wait(timeout=30)["StatusCode"] == 1
        assert "Error: STANDIN_FAIL_START is set" in failing.logs()
    finally:
        remove(failing.container)


# ------------------------------------------------------------------- behaviours read in Ollama's source

SMALL = {
    "size": 100_000_000,
    "block_count": 4,
    "embedding_length": 256,
    "head_count": 4,
    "head_count_kv": 2,
    "context_length": 32768,
}
EMBED = {
    "size": 50_000_000,
    "capabilities": ["embedding"],
    "embedding_length": 16,
    "block_count": 4,
    "head_count": 4,
    "context_length": 2048,
}


def stats(standin: Standin) -> dict:
    return standin.get("/standin/stats")[1]


@pytest.fixture
def fresh(client, image, tmp_path):
    """Start a stand-in of its own, with ``env`` and a registry of small models, and pull ``pull`` into it."""
    started: list[Standin] = []

    def start(env: dict | None = None, registry: dict | None = None, pull: tuple[str, ...] = ()) -> Standin:
        store = tmp_path / f"store-{len(started)}"
        store.mkdir()
        standin = run_standin(
            client,
            store,
            {
                "STANDIN_PULL_SECONDS": "0",
                "STANDIN_LOAD_SECONDS": "0.05",
                "STANDIN_REGISTRY": json.dumps(registry or {"small:1b": SMALL}),
                **(env or {}),
            },
        )
        started.append(standin)
        for name in pull:
            assert standin.post("/api/pull", {"model": name, "stream": False}) == (200, {"status": "success"})
        return standin

    yield start
    for standin in started:
        remove(standin.container)


def in_thread(call) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    return thread, result


def test_delayed_unload_answers_at_once_and_the_runner_goes_after_its_requests(fresh):
    """server/routes.go GenerateHandler + sched.go expireRunner/processCompleted: keep_alive 0 only queues the unload."""
    standin = fresh({"STANDIN_UNLOAD_SECONDS": "0.5", "STANDIN_TOKEN_SECONDS": "0.05"}, pull=("small:1b",))
    thread, _ = in_thread(lambda: standin.lines("/api/generate", {"model": "small:1b", "prompt": "hi"}))
    poll_for(lambda: standin.ps(), 10, "the model to load")
    started = time.monotonic()
    status, answer = standin.post("/api/generate", {"model": "small:1b", "keep_alive": 0, "stream": False})
    assert status == 200 and answer["done_reason"] == "unload" and time.monotonic() - started < 0.3
    assert [m["name"] for m in standin.ps()] == ["small:1b"]  # still generating: the runner stays
    thread.join(10)
    assert [m["name"] for m in standin.ps()] == ["small:1b"]  # the request ended; the runner stops 0.5 s later
    poll_for(lambda: standin.ps() == [], 5, "the runner to go")
    assert time.monotonic() - started >= 0.5 and stats(standin)["unloads"] == 1


def test_vram_eviction_and_partial_offload_with_memory_used_elsewhere(fresh):
    """sched.go load: a load needing more than 80% of free VRAM evicts first; alone, it offloads part to the CPU."""
    registry = {"a:1b": {**SMALL, "size": 500_000_000}, "b:1b": {**SMALL, "size": 400_000_000}}
    standin = fresh(
        {"STANDIN_VRAM_BYTES": str(10**9), "STANDIN_VRAM_USED_ELSEWHERE": str(3 * 10**8), "OLLAMA_KEEP_ALIVE": "-1"},
        registry,
        pull=("a:1b", "b:1b"),
    )
    standin.post("/api/generate", {"model": "a:1b"})
    [a] = standin.ps()
    assert a["size_vram"] == a["size"]  # 700 MB free: it fits
    standin.post("/api/generate", {"model": "b:1b"})  # 200 MB free, 80% of it is less than b: a goes first
    [b] = standin.ps()
    assert b["name"] == "b:1b" and b["size_vram"] == b["size"] and stats(standin)["evictions"] == 1
    assert standin.post("/standin/vram", {"used_elsewhere": 8 * 10**8})[0] == 200  # e.g. a llama.cpp container
    standin.post("/api/generate", {"model": "a:1b"})  # b is evicted, and a alone still does not fit
    [a] = standin.ps()
    assert a["name"] == "a:1b" and 0 < a["size_vram"] < a["size"] and a["size_vram"] <= 2 * 10**8
    assert stats(standin)["evictions"] == 2 and "evicting a model to make room" in standin.logs()


def test_eviction_takes_the_shortest_keep_alive_first(fresh):
    """sched.go findRunnerToUnload: idle runners ordered by keep-alive (forever last), then by model path."""
    registry = {name: {**SMALL, "size": 350_000_000} for name in ("a:1b", "b:1b", "c:1b")}
    standin = fresh({"STANDIN_VRAM_BYTES": str(10**9)}, registry, pull=tuple(registry))
    standin.post("/api/generate", {"model": "a:1b", "keep_alive": -1})
    standin.post("/api/generate", {"model": "b:1b", "keep_alive": "10m"})
    standin.post("/api/generate", {"model": "c:1b"})  # about 290 MB free: 80% is less than c
    assert sorted(m["name"] for m in standin.ps()) == ["a:1b", "c:1b"]


def test_an_embedding_model_has_its_capability_embeds_and_cannot_generate(fresh):
    """server/images.go Capabilities, routes.go GenerateHandler/ChatHandler (400) and EmbedHandler, sched.go load."""
    standin = fresh({"OLLAMA_NUM_PARALLEL": "4"}, {"emb:1b": EMBED, "small:1b": SMALL}, pull=("emb:1b",))
    show = standin.post("/api/show", {"model": "emb:1b"})[1]
    assert show["capabilities"] == ["embedding"] and show["model_info"]["llama.pooling_type"] == 1
    assert standin.post("/api/generate", {"model": "emb:1b"}) == (400, {"error": '"emb:1b" does not support generate'})
    assert standin.post("/api/chat", {"model": "emb:1b", "messages": [{"role": "user", "content": "hi"}]}) == (
        400,
        {"error": '"emb:1b" does not support chat'},
    )
    assert standin.ps() == []
    status, answer = standin.post("/api/embed", {"model": "emb:1b", "input": ["a", "b"]})
    assert status == 200 and answer["model"] == "emb:1b" and [len(v) for v in answer["embeddings"]] == [16, 16]
    assert abs(sum(x * x for x in answer["embeddings"][0]) - 1) < 1e-4  # normalized, as EmbedHandler does
    [loaded] = standin.ps()
    assert loaded["size"] == 50_000_000 + kv_bytes(4, 16, 4, 4, 2048)  # one slot, whatever OLLAMA_NUM_PARALLEL
    with openai.OpenAI(base_url=standin.url + "/v1", api_key="ollama", max_retries=0) as sdk:
        vectors = sdk.embeddings.create(model="emb:1b", input=["a", "c"])
    assert vectors.data[0].embedding == pytest.approx(answer["embeddings"][0], abs=1e-6)
    assert standin.post("/api/embed", {"model": "nope:1b", "input": "x"}) == (
        404,
        {"error": 'model "nope:1b" not found, try pulling it first'},
    )
    assert standin.post("/api/generate", {"model": "emb:1b", "keep_alive": 0})[0] == 200  # unloading comes first


def test_a_modelfile_num_ctx_is_used_and_capped_and_a_different_one_reloads(fresh):
    """routes.go modelOptions (Modelfile over OLLAMA_CONTEXT_LENGTH), sched.go needsReload/effectiveContext."""
    registry = {"own:1b": {**SMALL, "num_ctx": 8192}, "small:1b": SMALL}
    standin = fresh({"OLLAMA_CONTEXT_LENGTH": "4096", "OLLAMA_KEEP_ALIVE": "-1"}, registry, pull=tuple(registry))
    show = standin.post("/api/show", {"model": "own:1b"})[1]
    assert show["parameters"] == "num_ctx" + " " * 24 + "8192" and "PARAMETER num_ctx 8192\n" in show["modelfile"]
    with openai.OpenAI(base_url=standin.url + "/v1", api_key="ollama", max_retries=0) as sdk:
        for name in ("own:1b", "small:1b"):
            sdk.chat.completions.create(model=name, max_tokens=1, messages=[{"role": "user", "content": "hi"}])
    assert {m["name"]: m["context_length"] for m in standin.ps()} == {"own:1b": 8192, "small:1b": 4096}
    assert stats(standin)["reloads"] == 0
    standin.post("/api/generate", {"model": "own:1b", "options": {"num_ctx": 4096}})
    assert stats(standin)["reloads"] == 1
    assert {m["name"]: m["context_length"] for m in standin.ps()}["own:1b"] == 4096
    standin.post("/api/generate", {"model": "small:1b", "options": {"num_ctx": 65536}})  # capped: 32768
    assert {m["name"]: m["context_length"] for m in standin.ps()}["small:1b"] == 32768
    assert stats(standin)["reloads"] == 2


def test_one_load_at_a_time_and_ps_waits_for_a_load(fresh):
    """sched.go processPending (one load at a time) and loadedModels (it waits for a loading runner's lock)."""
    registry = {"a:1b": SMALL, "b:1b": SMALL}
    standin = fresh({"STANDIN_LOAD_SECONDS": "0.6"}, registry, pull=tuple(registry))
    started = time.monotonic()
    loads = [
        in_thread(lambda name=name: (standin.post("/api/generate", {"model": name}), time.monotonic()))
        for name in registry
    ]
    time.sleep(0.2)
    listed = standin.ps()
    waited = time.monotonic() - started
    assert waited >= 0.5 and len(listed) in (1, 2)  # not before the first load ended
    for thread, _ in loads:
        thread.join(10)
    ends = sorted(result[0][1] - started for _, result in loads)
    assert ends[0] >= 0.55 and ends[1] >= 1.15, ends  # the second load started when the first ended
    assert len(standin.ps()) == 2 and stats(standin)["loads"] == 2


def test_a_load_whose_client_leaves_is_aborted(fresh):
    """llm/llama_server.go WaitUntilRunning returns on ctx.Done(); sched.go load expires the runner."""
    standin = fresh({"STANDIN_LOAD_SECONDS": "1.5"}, pull=("small:1b",))
    with pytest.raises(requests.Timeout):
        requests.post(standin.url + "/api/generate", json={"model": "small:1b", "keep_alive": -1}, timeout=0.4)
    poll_for(lambda: stats(standin)["aborted_loads"] == 1, 5, "the load to be aborted")
    assert standin.ps() == [] and stats(standin)["loads"] == 0
    assert "client connection closed before llama-server finished loading" in standin.logs()


def test_names_match_whatever_their_case_with_default_registry_and_namespace(fresh):
    """types/model/name.go ParseName/DisplayShortest and routes.go getExistingName."""
    standin = fresh({"OLLAMA_KEEP_ALIVE": "-1"}, {"tiny-a:1b": SMALL}, pull=("tiny-a:1b",))
    assert standin.post("/api/generate", {"model": "Tiny-A:1B"})[1]["model"] == "Tiny-A:1B"  # echoed as asked
    for name in ("library/tiny-a:1b", "registry.ollama.ai/library/TINY-A:1b", "REGISTRY.ollama.ai/Library/tiny-a:1B"):
        assert standin.post("/api/show", {"model": name})[0] == 200, name
        assert standin.post("/api/generate", {"model": name})[0] == 200, name
    assert [m["name"] for m in standin.ps()] == ["tiny-a:1b"] and stats(standin)["loads"] == 1
    assert standin.post("/api/pull", {"model": "Tiny-A:1B", "stream": False})[0] == 200  # present: nothing new
    assert [m["name"] for m in standin.get("/api/tags")[1]["models"]] == ["tiny-a:1b"]
    assert requests.delete(standin.url + "/api/delete", json={"model": "Library/Tiny-A:1b"}, timeout=10).ok


def test_show_gives_kv_lengths_and_nulls_arrays_unless_verbose(fresh):
    """routes.go GetModelInfo/getModelData: the GGUF is read with maxArraySize 0, so arrays are null unless verbose."""
    layered = {
        **SMALL,
        "head_count": [4, 4, 8, 8],
        "head_count_kv": [2, 2, 4, 4],
        "key_length": 128,
        "value_length": 96,
    }
    standin = fresh(registry={"layered:1b": layered}, pull=("layered:1b",))
    info = standin.post("/api/show", {"model": "layered:1b"})[1]["model_info"]
    assert info["llama.attention.head_count"] is None and info["llama.attention.head_count_kv"] is None
    assert (info["llama.attention.key_length"], info["llama.attention.value_length"]) == (128, 96)
    verbose = standin.post("/api/show", {"model": "layered:1b", "verbose": True})[1]["model_info"]
    assert verbose["llama.attention.head_count"] == [4, 4, 8, 8]
    standin.post("/api/generate", {"model": "layered:1b", "options": {"num_ctx": 1024}})
    assert standin.ps()[0]["size"] == 100_000_000 + (2 + 2 + 4 + 4) * (128 + 96) * 1024 * 2


def sse(standin: Standin, body: dict) -> tuple[int, list]:
    """A /v1 stream as sent: each ``data:`` payload, parsed unless it is ``[DONE]``."""
    with requests.post(
        standin.url + "/v1/chat/completions", json={**body, "stream": True}, stream=True, timeout=30
    ) as response:
        events = [line[len(b"data: ") :] for line in response.iter_lines() if line.startswith(b"data: ")]
        return response.status_code, [e.decode() if e == b"[DONE]" else json.loads(e) for e in events]


def test_v1_chunks_and_errors_are_shaped_as_ollamas(fresh):
    """middleware/openai.go ChatWriter, openai/openai.go ToStreamChunks/FinishChunk/NewError."""
    standin = fresh(pull=("small:1b",))
    hi = [{"role": "user", "content": "hi"}]
    status, events = sse(
        standin, {"model": "small:1b", "messages": hi, "max_tokens": 3, "stream_options": {"include_usage": True}}
    )
    assert status == 200 and events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    assert deltas == [{"role": "assistant", "content": "Hello"}, {"content": " from"}, {"content": " the"}, {}]
    assert events[3]["choices"][0]["finish_reason"] == "length"
    assert events[4]["choices"] == [] and events[4]["usage"]["completion_tokens"] == 3
    _, ignored = sse(standin, {"model": "small:1b", "messages": hi, "max_completion_tokens": 2})
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in ignored[:-1]) == CANNED  # not read
    assert ignored[-2]["choices"][0]["finish_reason"] == "stop"
    with requests.post(
        standin.url + "/v1/chat/completions", json={"model": "nope:1b", "messages": hi}, timeout=10
    ) as response:
        assert response.status_code == 404 and response.json() == {
            "error": {"message": "model 'nope:1b' not found", "type": "not_found_error", "param": None, "code": None}
        }
    with requests.post(
        standin.url + "/v1/chat/completions", json={"model": "small:1b", "messages": []}, timeout=10
    ) as response:
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_a_stream_that_fails_after_n_tokens_ends_as_ollamas_does(fresh):
    """llm/llama_server.go Completion ("unexpected EOF"), routes.go streamResponse, middleware/openai.go ChatWriter."""
    standin = fresh({"STANDIN_STREAM_FAIL_AFTER": "2", "OLLAMA_KEEP_ALIVE": "-1"}, pull=("small:1b",))
    _, _, lines = standin.lines("/api/generate", {"model": "small:1b", "prompt": "hi"})
    assert [line.get("response") for line in lines[:2]] == ["Hello", " from"]
    assert lines[2:] == [{"error": "an error was encountered while running the model: unexpected EOF"}]
    status, events = sse(standin, {"model": "small:1b", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and "[DONE]" not in events and len(events) == 3
    assert events[-1]["model"] == "" and events[-1]["choices"] == [
        {"index": 0, "delta": {"content": ""}, "finish_reason": None}
    ]  # no finish reason, no [DONE]
    assert standin.post("/api/generate", {"model": "small:1b", "prompt": "hi", "stream": False}) == (
        500,
        {"error": "an error was encountered while running the model: unexpected EOF"},
    )
    assert stats(standin)["reloads"] == 2  # each request after a crash found the runner dead and reloaded it


def test_503_past_the_queue(fresh):
    """sched.go getRunner: the pending queue holds OLLAMA_MAX_QUEUE requests; past it, ErrMaxQueue (503)."""
    registry = {"a:1b": SMALL, "b:1b": SMALL, "c:1b": SMALL}
    standin = fresh({"OLLAMA_MAX_QUEUE": "1", "STANDIN_LOAD_SECONDS": "1"}, registry, pull=tuple(registry))
    first, _ = in_thread(lambda: standin.post("/api/generate", {"model": "a:1b"}))  # loading
    time.sleep(0.15)
    second, _ = in_thread(lambda: standin.post("/api/generate", {"model": "b:1b"}))  # queued
    time.sleep(0.15)
    assert standin.post("/api/generate", {"model": "c:1b"}) == (
        503,
        {"error": "server busy, please try again.  maximum pending requests exceeded"},
    )
    with requests.post(
        standin.url + "/v1/chat/completions",
        timeout=10,
        json={"model": "c:1b", "messages": [{"role": "user", "content": "hi"}]},
    ) as response:
        assert response.status_code == 503 and response.json()["error"]["type"] == "api_error"
    first.join(10)
    second.join(10)
    assert stats(standin)["busy_rejections"] == 2 and len(standin.ps()) == 2


def test_a_pull_has_a_silent_phase_while_verifying(fresh):
    """server/images.go PullModel: "verifying sha256 digest", then nothing while the blobs are hashed."""
    standin = fresh({"STANDIN_PULL_SILENT_SECONDS": "1"})
    times = []
    with requests.post(standin.url + "/api/pull", json={"model": "small:1b"}, stream=True, timeout=30) as response:
        for line in response.iter_lines():
            if line:
                times.append((time.monotonic(), json.loads(line)["status"]))
    statuses = [status for _, status in times]
    verify = statuses.index("verifying sha256 digest")
    assert statuses[verify + 1 :] == ["writing manifest", "success"]
    assert times[verify + 1][0] - times[verify][0] >= 0.9


def test_unloading_a_deleted_model_is_a_404_and_its_runner_stays(fresh):
    """routes.go GenerateHandler: getModel fails before expireRunner; DeleteHandler unloads nothing."""
    standin = fresh({"OLLAMA_KEEP_ALIVE": "-1"}, pull=("small:1b",))
    standin.post("/api/generate", {"model": "small:1b"})
    assert requests.delete(standin.url + "/api/delete", json={"model": "small:1b"}, timeout=10).ok
    assert standin.post("/api/generate", {"model": "small:1b", "keep_alive": 0}) == (
        404,
        {"error": "model 'small:1b' not found"},
    )
    assert [m["name"] for m in standin.ps()] == ["small:1b"]


def test_a_load_past_ollama_load_timeout_fails(fresh):
    """llm/llama_server.go WaitUntilRunning: a load stalled past OLLAMA_LOAD_TIMEOUT fails; the runner goes."""
    standin = fresh({"OLLAMA_LOAD_TIMEOUT": "300ms", "STANDIN_LOAD_SECONDS": "5"}, pull=("small:1b",))
    assert standin.post("/api/generate", {"model": "small:1b"}) == (
        500,
        {"error": "timed out waiting for llama-server to start - "},
    )
    assert standin.ps() == [] and stats(standin)["failed_loads"] == 1
