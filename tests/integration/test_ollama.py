"""The Ollama backend on the real engine, against the Ollama STAND-IN (tests/integration/ollama_standin).

No registry reachable here ships Ollama, so the server container runs the
stand-in image: the subset of Ollama's documented API localllm uses, with the
same shapes. Everything else is real: the daemon, the Docker engine, the
container, llama-server beside it. On a host with the real image, set
LOCALLLM_OLLAMA_IMAGE=ollama/ollama and LOCALLLM_OLLAMA_TAGS to two small tags
it can pull (e.g. "qwen2.5:0.5b,smollm:135m") to run the same tests against it.
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest
import requests
import yaml
from openai import OpenAI

from .conftest import ask_server, assert_invariants, executable, our_containers, poll_for
from .ollama_standin import ensure_standin_image

REAL_IMAGE = os.environ.get("LOCALLLM_OLLAMA_IMAGE")
TAG_A, TAG_B = (os.environ.get("LOCALLLM_OLLAMA_TAGS") or "tiny-a:1b,tiny-b:1b").split(",")
REGISTRY = {
    TAG_A: {"size": 200_000_000, "parameter_size": "1.1B", "quantization_level": "Q4_0"},
    TAG_B: {"size": 300_000_000, "parameter_size": "1.5B", "quantization_level": "Q8_0"},
}


@pytest.fixture(scope="module")
def ollama_image(engine) -> str:
    return REAL_IMAGE or ensure_standin_image(engine)


@pytest.fixture
def with_ollama(start_daemon, ollama_image, tmp_path):
    """Start a daemon whose catalog holds Ollama models (and any others given)."""

    def start(
        models: list[dict],
        env: dict | None = None,
        top: dict | None = None,
        ollama_settings: dict | None = None,
        **settings,
    ):
        section = {
            "image": ollama_image,
            "models_dir": str(tmp_path / "ollama-store"),
            "startup_timeout": 30,
            "env": {"STANDIN_REGISTRY": json.dumps(REGISTRY), "STANDIN_PULL_SECONDS": "0.5", **(env or {})},
            **(ollama_settings or {}),
        }
        settings.setdefault("liveness", {"period": 0.5, "timeout": 1, "failure_threshold": 2})
        return start_daemon(models, top={"ollama": section, **(top or {})}, **settings)

    return start


def ollama_model(name: str, tag: str, **extra) -> dict:
    return {"name": name, "backend": "ollama", "tag": tag, "pull": True, **extra}


def ctl(daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [executable("localllmctl"), "--socket", str(daemon.socket), *args], capture_output=True, text=True, timeout=120
    )


SERVER = "_ollama"  # the model label of the Ollama server's container


def server_of(engine, daemon):
    [server] = [c for c in our_containers(engine, daemon.instance) if c.labels["io.localllm.model"] == "_ollama"]
    return server


def ollama_ps(daemon, engine) -> list[str]:
    return list(ollama_ps_sizes(daemon, engine))


def ollama_ps_sizes(daemon, engine) -> dict[str, int]:
    """What the server itself says is loaded (``/api/ps``), with each model's size."""
    models = json.loads(ask_server(engine, daemon, SERVER, "/api/ps"))["models"]
    return {m["name"]: m["size"] for m in models}


def crash_and_restart(daemon) -> None:
    """kill -9 the daemon, then start it again on the same config and wait until it answers."""
    daemon.process.kill()
    daemon.process.wait(10)
    with daemon.log_path.open("a") as log:
        daemon.process = subprocess.Popen(
            [executable("localllmd"), "--config", str(daemon.config_path)], stdout=log, stderr=subprocess.STDOUT
        )
    poll_for(lambda: daemon.try_status(), 30, "the daemon back")


def test_start_pull_with_progress_then_ready_and_served(with_ollama, engine):
    daemon = with_ollama([ollama_model("chat-a", TAG_A, aliases=["a"])])
    assert our_containers(engine, daemon.instance) == []  # the server starts when a model needs it
    done = ctl(daemon, "load", "a")
    assert done.returncode == 0, done.stderr
    pulls = [line for line in done.stderr.splitlines() if " pull " in f" {line} "]
    assert pulls and pulls[-1].endswith(f"pulling {TAG_A}: success"), done.stderr
    assert any("%" in line for line in pulls), pulls  # progress, with the share done
    model = daemon.model("chat-a")
    assert model["state"] == "ready" and model["tag"] == TAG_A
    assert model["memory"]["measured"] == ollama_ps_sizes(daemon, engine)[TAG_A] > REGISTRY[TAG_A]["size"]  # + KV
    assert ollama_ps(daemon, engine) == [TAG_A]

    client = OpenAI(base_url=daemon.proxy_url, api_key="none")
    stream = client.chat.completions.create(
        model="a",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        max_tokens=5,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    tags = requests.get(daemon.proxy_url.removesuffix("/v1") + "/api/tags", timeout=10).json()
    assert [m["name"] for m in tags["models"]] == ["chat-a"]
    assert_invariants(daemon, engine)


def test_unload_and_load_go_through_the_api_and_the_server_stays(with_ollama, engine):
    daemon = with_ollama([ollama_model("chat-a", TAG_A, preload=True), ollama_model("chat-b", TAG_B)])
    server = server_of(engine, daemon)
    assert ctl(daemon, "load", "chat-b").returncode == 0
    assert sorted(ollama_ps(daemon, engine)) == sorted([TAG_A, TAG_B])
    done = ctl(daemon, "unload", "chat-a")
    assert done.returncode == 0, done.stderr
    assert ollama_ps(daemon, engine) == [TAG_B]
    assert server_of(engine, daemon).id == server.id  # unloading a model never touches the container
    assert daemon.model("chat-a")["state"] == "stopped"
    assert daemon.chat("chat-a").status_code == 200  # loaded again on demand
    assert sorted(ollama_ps(daemon, engine)) == sorted([TAG_A, TAG_B])


def test_sigterm_removes_the_server_and_its_network(with_ollama, engine):
    daemon = with_ollama([ollama_model("chat-a", TAG_A, preload=True)])
    [network] = engine.networks.list(filters={"label": f"io.localllm.owner={daemon.instance}"})
    assert network.name == f"localllm-{daemon.instance}"  # the server's own namespace, not the host's
    assert daemon.terminate() == 0
    assert our_containers(engine, daemon.instance) == []
    assert engine.networks.list(filters={"label": f"io.localllm.owner={daemon.instance}"}) == []


def test_missing_model_without_pull_is_a_clear_error(with_ollama):
    daemon = with_ollama([{"name": "nopull", "backend": "ollama", "tag": TAG_B}])
    answer = daemon.chat("nopull")
    assert answer.status_code == 503
    assert f"the Ollama server has no '{TAG_B}', and pull is off" in daemon.model("nopull")["error"]


def test_swap_between_an_ollama_model_and_a_llamacpp_model_in_one_budget(with_ollama, engine, models_dir, tmp_path):
    from .test_generations import one_model_budget

    top = one_model_budget(tmp_path, models_dir)
    need = int(
        yaml.safe_load((tmp_path / "profiles" / "one-model.yaml").read_text())["hardware"]["ram_gib"] * 1024**3 / 1.5
    )
    daemon = with_ollama([ollama_model("chat-a", TAG_A, memory=need), {"name": "tiny", "gguf": "tiny.gguf"}], top=top)
    assert daemon.chat("chat-a").status_code == 200
    server = server_of(engine, daemon)
    assert daemon.chat("tiny").status_code == 200  # evicts chat-a: unloaded through the API
    assert daemon.model("chat-a")["state"] == "stopped" and daemon.model("tiny")["state"] == "ready"
    assert ollama_ps(daemon, engine) == []
    assert server_of(engine, daemon).id == server.id  # the eviction unloaded the model, not the container
    assert daemon.chat("chat-a").status_code == 200  # and back
    assert daemon.model("tiny")["state"] == "stopped" and ollama_ps(daemon, engine) == [TAG_A]
    events = [json.loads(line) for line in ctl(daemon, "events", "--json", "-n", "1000").stdout.splitlines()]
    assert [e["model"] for e in events if e["kind"] == "evict"] == ["chat-a", "tiny"]
    assert_invariants(daemon, engine)


def test_a_crashed_ollama_server_is_restarted_and_its_models_reload_on_demand(with_ollama, engine):
    daemon = with_ollama([ollama_model("chat-a", TAG_A, preload=True), ollama_model("chat-b", TAG_B)])
    assert ctl(daemon, "load", "chat-b").returncode == 0
    server = server_of(engine, daemon)
    server.kill()
    poll_for(lambda: daemon.model("chat-b")["state"] != "ready", 20, "the crash to be noticed")
    daemon.wait_state("chat-a", "ready", timeout=30)  # preloaded, so wanted: restarted on its own
    assert daemon.chat("chat-b").status_code == 200  # on demand
    assert server_of(engine, daemon).id != server.id
    assert sorted(ollama_ps(daemon, engine)) == sorted([TAG_A, TAG_B])
    crashes = [json.loads(line) for line in ctl(daemon, "events", "--json", "-n", "1000").stdout.splitlines()]
    assert {e["model"] for e in crashes if e["kind"] == "crash"} == {"chat-a", "chat-b"}


def test_a_bad_ollama_config_is_rolled_back(with_ollama, engine, tmp_path):
    daemon = with_ollama([ollama_model("chat-a", TAG_A, preload=True), ollama_model("chat-b", TAG_B, preload=True)])
    config = yaml.safe_load(daemon.config_path.read_text())
    config["ollama"]["env"]["STANDIN_FAIL_START"] = "1"
    bad = tmp_path / "bad-ollama.yaml"
    bad.write_text(yaml.safe_dump(config))
    done = ctl(daemon, "apply", str(bad))
    assert done.returncode == 1, done.stderr
    assert "reverted to last-good" in done.stderr and "the Ollama server did not start" in done.stderr
    history = json.loads(ctl(daemon, "history", "--json").stdout)
    assert [g["status"] for g in history] == ["good", "failed"]
    assert daemon.model("chat-a")["state"] == "ready" and daemon.model("chat-b")["state"] == "ready"
    assert daemon.chat("chat-a").status_code == 200 and daemon.chat("chat-b").status_code == 200
    server = server_of(engine, daemon)
    assert "STANDIN_FAIL_START=1" not in server.attrs["Config"]["Env"]

    config["ollama"]["env"].pop("STANDIN_FAIL_START")
    config["ollama"]["num_parallel"] = 2
    good = tmp_path / "good-ollama.yaml"
    good.write_text(yaml.safe_dump(config))
    done = ctl(daemon, "apply", str(good))
    assert done.returncode == 0, done.stderr
    assert "OLLAMA_NUM_PARALLEL=2" in server_of(engine, daemon).attrs["Config"]["Env"]  # one server: the new one
    assert sorted(ollama_ps(daemon, engine)) == sorted([TAG_A, TAG_B])  # both reloaded into it
    assert daemon.chat("chat-a").status_code == 200 and daemon.chat("chat-b").status_code == 200
    assert_invariants(daemon, engine)


def test_the_daemon_adopts_the_ollama_server_and_its_loaded_models_after_a_crash(with_ollama, engine):
    daemon = with_ollama([ollama_model("chat-a", TAG_A, preload=True)])
    server = server_of(engine, daemon)
    crash_and_restart(daemon)
    assert daemon.model("chat-a")["state"] == "ready"
    assert server_of(engine, daemon).id == server.id
    assert "adopted: loaded in the Ollama server" in daemon.log()


def test_estimate_for_an_ollama_model_uses_show_or_what_was_measured(with_ollama, engine):
    daemon = with_ollama([ollama_model("chat-a", TAG_A, preload=True), ollama_model("chat-b", TAG_B)])
    measured = json.loads(ctl(daemon, "--config", str(daemon.config_path), "estimate", "chat-a", "--json").stdout)
    assert measured["source"] == "measured" and measured["measured"] == ollama_ps_sizes(daemon, engine)[TAG_A]
    assert measured["need"] == measured["measured"]  # what it uses is what it is admitted with from now on
    assert ctl(daemon, "load", "chat-b").returncode == 0 and ctl(daemon, "unload", "chat-b").returncode == 0
    done = ctl(daemon, "--config", str(daemon.config_path), "estimate", "chat-b")
    assert done.returncode == 0, done.stderr
    assert "/api/show" in done.stdout and "1.5B parameters, Q8_0" in done.stdout


def test_a_model_ollama_evicts_on_its_own_is_shown_stopped_with_an_event(with_ollama, engine):
    # Ollama evicts idle models by its own rules, and a runner can die: the daemon polls /api/ps each tick.
    daemon = with_ollama([ollama_model("chat-a", TAG_A)])
    assert ctl(daemon, "load", "chat-a").returncode == 0
    ask_server(
        engine,
        daemon,
        SERVER,
        "/api/generate",  # behind our back: the raw API, on its socket
        {"model": TAG_A, "prompt": "", "keep_alive": 0, "stream": False},
    )
    daemon.wait_state("chat-a", "stopped", timeout=10)
    events = [json.loads(line) for line in ctl(daemon, "events", "--json", "-n", "1000").stdout.splitlines()]
    [evicted] = [e for e in events if e["kind"] == "evict" and e["model"] == "chat-a"]
    assert evicted["message"] == "evicted by Ollama: it unloaded the model on its own (for room, or its runner exited)"
    assert evicted["data"]["cause"] == "server"
    assert daemon.chat("chat-a").status_code == 200  # the next request loads it again, within our budget
    assert ollama_ps(daemon, engine) == [TAG_A]


# -- Ollama as it really behaves (the faithful stand-in's settings) -----------------------------------------------


def standin_stats(daemon, engine) -> dict:
    """The stand-in's own counters (GET /standin/stats; real Ollama has no such route)."""
    return json.loads(ask_server(engine, daemon, SERVER, "/standin/stats"))


def events_of(daemon, kind: str) -> list[dict]:
    events = [json.loads(line) for line in ctl(daemon, "events", "--json", "-n", "1000").stdout.splitlines()]
    return [e for e in events if e["kind"] == kind]


def test_a_load_that_times_out_is_unloaded_and_leaves_nothing_loaded(with_ollama, engine):
    # The load runs on in Ollama after our deadline (here: its client leaving does not abort it) and would stay
    # loaded forever (keep_alive -1) in memory our budget counts as free.
    daemon = with_ollama(
        [ollama_model("chat-a", TAG_A, startup_timeout=1)],
        env={"STANDIN_LOAD_SECONDS": "2.5", "STANDIN_ABORT_ON_DISCONNECT": "0"},
    )
    done = ctl(daemon, "load", "chat-a")
    assert done.returncode != 0 and "did not load" in done.stderr
    poll_for(lambda: standin_stats(daemon, engine)["loads"] >= 1, 10, "the late load to finish inside Ollama")
    poll_for(lambda: ollama_ps(daemon, engine) == [], 10, "the late load to be unloaded")


def test_a_swap_from_an_ollama_model_waits_for_its_runner_to_go(with_ollama, engine, models_dir, tmp_path):
    # keep_alive 0 only queues the unload: the llama.cpp container must not start before the runner is gone.
    from .test_generations import one_model_budget

    top = one_model_budget(tmp_path, models_dir)
    need = int(
        yaml.safe_load((tmp_path / "profiles" / "one-model.yaml").read_text())["hardware"]["ram_gib"] * 1024**3 / 1.5
    )
    daemon = with_ollama(
        [ollama_model("chat-a", TAG_A, memory=need), {"name": "tiny", "gguf": "tiny.gguf"}],
        top=top,
        env={"STANDIN_UNLOAD_SECONDS": "2"},
    )
    assert daemon.chat("chat-a").status_code == 200
    assert daemon.chat("tiny").status_code == 200  # evicts chat-a
    [evicted] = [e for e in events_of(daemon, "evict") if e["model"] == "chat-a"]
    [tiny] = [c for c in our_containers(engine, daemon.instance) if c.labels["io.localllm.model"] == "tiny"]
    created = datetime.fromisoformat(tiny.attrs["Created"][:26].rstrip("Z") + "+00:00").timestamp()
    assert created - evicted["time"] >= 1.8  # the runner's 2 s of shutdown came first
    assert ollama_ps(daemon, engine) == []


def test_an_embedding_model_starts_through_api_embed_and_serves_embeddings(with_ollama, engine):
    registry = {
        **REGISTRY,
        "embed:1b": {
            "size": 100_000_000,
            "parameter_size": "0.3B",
            "quantization_level": "F16",
            "capabilities": ["embedding"],
        },
    }
    daemon = with_ollama([ollama_model("embedder", "embed:1b")], env={"STANDIN_REGISTRY": json.dumps(registry)})
    done = ctl(daemon, "load", "embedder")
    assert done.returncode == 0, done.stderr  # /api/generate would answer 400 "does not support generate"
    answer = requests.post(f"{daemon.proxy_url}/embeddings", json={"model": "embedder", "input": "hello"}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["data"][0]["embedding"]) > 0


def test_a_model_whose_modelfile_sets_num_ctx_is_not_reloaded_by_its_first_chat(with_ollama, engine):
    registry = {
        **REGISTRY,
        "ctx-8k:1b": {
            "size": 200_000_000,
            "parameter_size": "1.1B",
            "quantization_level": "Q4_0",
            "num_ctx": 8192,
            "context_length": 32768,
        },
    }
    daemon = with_ollama(
        [ollama_model("long", "ctx-8k:1b")],
        env={"STANDIN_REGISTRY": json.dumps(registry)},
        ollama_settings={"context_size": 4096},
    )
    assert ctl(daemon, "load", "long").returncode == 0
    assert daemon.chat("long").status_code == 200  # /v1 uses the Modelfile's num_ctx
    stats = standin_stats(daemon, engine)
    assert (stats["loads"], stats["reloads"]) == (1, 0)


def test_models_started_at_once_are_all_measured(with_ollama, engine):
    # Ollama loads one model at a time, and /api/ps waits while one loads: measuring the first model waits for
    # the second's whole load (11 s here, past the 10 s the client used to allow).
    daemon = with_ollama(
        [ollama_model(n, t, preload=True) for n, t in (("chat-a", TAG_A), ("chat-b", TAG_B))],
        env={"STANDIN_LOAD_SECONDS": "11"},
    )
    for name in ("chat-a", "chat-b"):
        daemon.wait_state(name, "ready", timeout=60)
    sizes = ollama_ps_sizes(daemon, engine)
    poll_for(
        lambda: all(daemon.model(n)["memory"]["measured"] for n in ("chat-a", "chat-b")), 5, "both models measured"
    )
    assert {daemon.model(n)["memory"]["measured"] for n in ("chat-a", "chat-b")} == set(sizes.values())


def test_a_tag_that_differs_only_in_case_is_found_without_a_pull_and_adopted_after_a_crash(with_ollama, engine):
    daemon = with_ollama([{"name": "upper", "backend": "ollama", "tag": TAG_A.upper(), "pull": False}])
    assert ctl(daemon, "load", "upper").returncode != 0  # the server starts, but has no such model yet
    ask_server(engine, daemon, SERVER, "/api/pull", {"model": TAG_A, "stream": False})
    done = ctl(daemon, "load", "upper")  # Ollama has it by another spelling: no pull (off here anyway)
    assert done.returncode == 0, done.stderr
    assert standin_stats(daemon, engine)["pulls"] == 1  # only ours
    crash_and_restart(daemon)
    assert daemon.model("upper")["state"] == "ready"  # adopted, not unloaded as "not in the catalog"
    assert ollama_ps(daemon, engine) == [TAG_A]


def test_a_stream_ollama_cuts_off_reaches_the_client_as_an_error(with_ollama, engine):
    daemon = with_ollama([ollama_model("chat-a", TAG_A, preload=True)], env={"STANDIN_STREAM_FAIL_AFTER": "2"})
    answer = daemon.chat("chat-a", stream=True, max_tokens=8)
    assert answer.status_code == 200
    events = [line[6:] for line in answer.text.splitlines() if line.startswith("data: ")]
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error["code"] == "upstream_failed" and "truncated" in error["message"]


def test_ollama_refusing_a_request_past_its_queue_is_a_clear_503(with_ollama, engine):
    # Requests for a runner that must be (re)loaded queue inside Ollama, and past OLLAMA_MAX_QUEUE get 503
    # "server busy". Here the runner dies during a first answer; it stays listed, and the next requests reload it.
    daemon = with_ollama(
        [ollama_model("chat-a", TAG_A, preload=True)],
        env={"OLLAMA_MAX_QUEUE": "1", "STANDIN_STREAM_FAIL_AFTER": "1", "STANDIN_LOAD_SECONDS": "1.5"},
    )
    assert daemon.chat("chat-a", stream=True).status_code == 200  # cut off: its runner died
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: daemon.chat("chat-a"), range(4)))
    busy = [a for a in answers if a.status_code == 503]
    assert busy, [(a.status_code, a.text[:200]) for a in answers]
    error = busy[0].json()["error"]
    assert error["code"] == "upstream_busy" and busy[0].headers["Retry-After"].isdigit()
    assert "queue is full" in error["message"] and "maximum pending requests exceeded" in error["message"]
