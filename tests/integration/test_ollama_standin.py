"""The Ollama STAND-IN (``ollama_standin/server.py``) in a real container on the real engine.

No Ollama image is reachable from the test machines, so the Ollama backend is tested against a
stand-in. These tests hold the stand-in to the shapes of Ollama's documented API (docs/api.md and
the OpenAI-compatible ``/v1``), so that the backend's tests can trust it. One container, with its
store in a host directory, serves the module; the tests run in file order and build on each other
(pull, then list, show, load, unload, chat, restart). Two more short-lived containers check the
load limit with a GPU and a start that fails.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
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
    "tiny-a:1b": {"size": 600_000_000, "parameter_size": "1.1B", "quantization_level": "Q4_0", "block_count": 22,
                  "embedding_length": 2048, "head_count": 32, "head_count_kv": 4, "context_length": 2048},
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
            return (response.status_code, response.headers.get("Content-Type", ""),
                    [json.loads(line) for line in response.iter_lines() if line])

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
    environment = {"OLLAMA_HOST": f"127.0.0.1:{port}", "OLLAMA_MODELS": "/root/.ollama/models",
                   "STANDIN_REGISTRY": json.dumps(REGISTRY), "STANDIN_PULL_SECONDS": str(PULL_SECONDS),
                   "STANDIN_LOAD_SECONDS": "0.1", "STANDIN_TOKEN_SECONDS": "0.005", **(env or {})}
    container = client.containers.run(
        STANDIN_IMAGE, ["serve"], detach=True, network_mode="host", environment=environment,
        name=f"localllm-ollama-standin-{RUN_ID}-{next(NUMBERS)}",
        labels={TEST_RUN_LABEL: RUN_ID, KIND_LABEL: "ollama-standin"},
        volumes={str(store): {"bind": "/root/.ollama", "mode": "rw"}})
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
    for container in engine.containers.list(all=True, ignore_removed=True, filters={
            "label": [f"{TEST_RUN_LABEL}={RUN_ID}", f"{KIND_LABEL}=ollama-standin"]}):
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
    assert '"/api/pull"' in standin.logs()


def test_tags_and_v1_models_list_what_the_store_holds(standin):
    status, tags = standin.get("/api/tags")
    assert status == 200 and [m["name"] for m in tags["models"]] == ["tiny-a:1b"]
    entry = tags["models"][0]
    assert set(entry) == {"name", "model", "modified_at", "size", "digest", "details"}
    assert entry["model"] == "tiny-a:1b" and entry["size"] == 600_000_000
    assert re.fullmatch(r"[0-9a-f]{64}", entry["digest"]) and GO_TIME.match(entry["modified_at"])
    assert entry["details"] == {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                                "parameter_size": "1.1B", "quantization_level": "Q4_0"}
    status, models = standin.get("/v1/models")
    assert status == 200 and models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [("tiny-a:1b", "model", "library")]


def test_pull_of_an_unknown_model_fails_and_the_old_name_field_works(standin):
    status, _, lines = standin.lines("/api/pull", {"model": "nope:1b"})
    assert status == 200  # the stream has started when the manifest turns out missing
    assert lines == [{"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}]
    assert standin.post("/api/pull", {"model": "nope:1b", "stream": False}) == (
        500, {"error": "pull model manifest: file does not exist"})
    # Older clients send "name"; without streaming the answer is one object.
    assert standin.post("/api/pull", {"name": "tiny-b:1b", "stream": False}) == (200, {"status": "success"})
    assert sorted(m["name"] for m in standin.get("/api/tags")[1]["models"]) == ["tiny-a:1b", "tiny-b:1b"]


def test_show_reports_details_and_model_info(standin):
    status, show = standin.post("/api/show", {"model": "tiny-a:1b"})
    assert status == 200
    assert {"modelfile", "parameters", "template", "details", "model_info"} <= set(show)
    assert show["details"]["parameter_size"] == "1.1B" and show["details"]["quantization_level"] == "Q4_0"
    info = show["model_info"]
    assert info["general.architecture"] == "llama" and info["general.parameter_count"] == 1_100_000_000
    assert (info["llama.block_count"], info["llama.context_length"], info["llama.embedding_length"],
            info["llama.attention.head_count"], info["llama.attention.head_count_kv"]) == (22, 2048, 2048, 32, 4)
    assert standin.post("/api/show", {"model": "nope:1b"}) == (404, {"error": "model 'nope:1b' not found"})


def test_generate_with_no_prompt_loads_and_ps_lists_the_model(standin):
    status, answer = standin.post("/api/generate", {"model": "tiny-a:1b", "prompt": "", "keep_alive": -1,
                                                    "options": {"num_ctx": 2048}, "stream": False})
    assert status == 200
    assert {k: answer[k] for k in ("model", "response", "done", "done_reason")} == {
        "model": "tiny-a:1b", "response": "", "done": True, "done_reason": "load"}
    assert GO_TIME.match(answer["created_at"])
    [loaded] = standin.ps()
    assert loaded["name"] == loaded["model"] == "tiny-a:1b"
    assert loaded["size"] == 600_000_000 + kv_bytes(22, 2048, 32, 4, 2048) and loaded["size_vram"] == 0
    tags = standin.get("/api/tags")[1]["models"]
    assert loaded["digest"] == next(m["digest"] for m in tags if m["name"] == "tiny-a:1b")
    assert loaded["details"] == next(m["details"] for m in tags if m["name"] == "tiny-a:1b")
    assert GO_TIME.match(loaded["expires_at"]) and int(loaded["expires_at"][:4]) > 2200  # keep_alive -1: forever
    assert standin.post("/api/generate", {"model": "nope:1b", "prompt": ""}) == (
        404, {"error": 'model "nope:1b" not found, try pulling it first'})
    assert standin.post("/api/generate", {"model": "tiny-a:1b", "keep_alive": "-1"})[0] == 400  # not a Go duration
    assert "loaded model" in standin.logs()


def test_generate_streams_text_until_num_predict(standin):
    status, content_type, lines = standin.lines("/api/generate", {"model": "tiny-a:1b", "prompt": "hi",
                                                                  "options": {"num_ctx": 2048, "num_predict": 3}})
    assert status == 200 and content_type.startswith("application/x-ndjson")
    assert [line["response"] for line in lines[:-1]] == ["Hello", " from", " the"]
    assert not any(line["done"] for line in lines[:-1])
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "length" and lines[-1]["eval_count"] == 3


def test_generate_with_keep_alive_0_unloads(standin):
    status, answer = standin.post("/api/generate", {"model": "tiny-a:1b", "prompt": "", "keep_alive": 0,
                                                    "stream": False})
    assert status == 200 and answer["done"] is True and answer["done_reason"] == "unload"
    assert standin.ps() == []


def test_openai_chat_through_the_sdk_loads_the_model_and_streams_with_usage(standin):
    with openai.OpenAI(base_url=standin.url + "/v1", api_key="ollama", max_retries=0) as sdk:
        chunks = []
        with sdk.chat.completions.create(model="tiny-a:1b", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=5, stream=True,
                                         stream_options={"include_usage": True}) as stream:
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

        with pytest.raises(openai.NotFoundError, match='model "nope:1b" not found, try pulling it first'):
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
    second = run_standin(client, store, {"OLLAMA_MAX_LOADED_MODELS": "1", "OLLAMA_NUM_PARALLEL": "2",
                                         "STANDIN_GPU": "1", "OLLAMA_KEEP_ALIVE": "-1"})
    try:
        for name in ("tiny-a:1b", "tiny-b:1b"):
            assert second.post("/api/generate", {"model": name, "options": {"num_ctx": 2048}})[1]["done_reason"] == "load"
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
