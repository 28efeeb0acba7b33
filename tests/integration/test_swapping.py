"""Swapping within a memory budget, on the real engine with real llama-server containers.

The budget is declared in a test profile (host memory on this GPU-less machine)
and sized from the estimator so that it holds two of the three test models.
What is running is checked from the Docker engine's side, not the daemon's.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import socket
import threading
import time

import pytest
import requests
import yaml

from supervisor.config.profiles import load_profiles
from supervisor.config.settings import ModelEntry
from supervisor.fleet.sizing import size_model

from .conftest import our_containers, poll_for

GIB = 1024**3
THREE = [{"name": n, "gguf": f"{n}.gguf"} for n in ("tiny", "tiny2", "tiny3")]


def need_of(models_dir, gguf: str, context: int = 256) -> int:
    entry = ModelEntry(name="m", gguf=models_dir / gguf, context_size=context)
    return size_model(entry, load_profiles()["cpu-only"]).need


@pytest.fixture
def budget_profile(tmp_path, models_dir):
    """Write a CPU profile whose budget is ``slots`` times the given model's need, plus half of one."""

    def write(slots: float, gguf: str = "tiny.gguf", context: int = 256) -> dict:
        budget = (slots + 0.5) * need_of(models_dir, gguf, context)
        profile = yaml.safe_load((load_profiles.__globals__["builtin_profiles_dir"]() / "cpu-only.yaml").read_text())
        profile["name"] = "test-budget"
        profile["hardware"]["ram_gib"] = budget / GIB
        profile["defaults"]["ram_reserve_gib"] = 0
        directory = tmp_path / "profiles"
        directory.mkdir(exist_ok=True)
        (directory / "test-budget.yaml").write_text(yaml.safe_dump(profile))
        return {"profile": "test-budget", "profiles_dir": str(directory)}

    return write


class EngineSampler:
    """Counts our running containers from the engine's side, every few milliseconds, in a thread."""

    def __init__(self, engine, instance: str):
        self.engine, self.instance = engine, instance
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        filters = {"label": f"io.localllm.owner={self.instance}"}
        while not self._stop.is_set():
            listed = self.engine.api.containers(all=True, filters=filters)  # one call: no race with removals
            self.samples.append(sum(1 for c in listed if c["State"] in ("created", "running")))
            time.sleep(0.005)

    def __enter__(self) -> EngineSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def running_models(engine, instance: str) -> set[str]:
    return {c.labels["io.localllm.model"] for c in our_containers(engine, instance) if c.status == "running"}


def test_rotating_requests_at_concurrency_8_all_succeed_and_never_overfill(start_daemon, engine, budget_profile):
    daemon = start_daemon(THREE, top=budget_profile(2), min_residency=0)
    names = itertools.cycle(["tiny", "tiny2", "tiny3"])
    with EngineSampler(engine, daemon.instance) as sampler:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda name: daemon.chat(name), [next(names) for _ in range(48)]))
    assert [r.status_code for r in responses] == [200] * 48, [r.text for r in responses if r.status_code != 200][:3]
    assert sorted({r.json()["model"] for r in responses}) == ["tiny", "tiny2", "tiny3"]
    assert len(sampler.samples) >= 10
    assert max(sampler.samples) <= 2, f"more containers than fit: {max(sampler.samples)}"
    assert "evicted" in daemon.log()


def test_the_least_recently_used_idle_model_is_evicted(start_daemon, engine, budget_profile):
    daemon = start_daemon(THREE, top=budget_profile(2), min_residency=0)
    for name in ("tiny", "tiny2", "tiny"):  # tiny2 is now the least recently used
        assert daemon.chat(name).status_code == 200
    assert running_models(engine, daemon.instance) == {"tiny", "tiny2"}
    assert daemon.chat("tiny3").status_code == 200
    assert running_models(engine, daemon.instance) == {"tiny", "tiny3"}
    assert daemon.model("tiny2")["state"] == "stopped"
    assert "stop: evicted: 'tiny3'" in daemon.log() and "after evicting tiny2" in daemon.log()


def test_a_model_bigger_than_the_budget_gets_a_clear_error(start_daemon, engine, budget_profile):
    daemon = start_daemon([*THREE, {"name": "big", "gguf": "slow.gguf"}], top=budget_profile(2))
    response = daemon.chat("big")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "model_too_large"
    assert "'big' needs" in error["message"] and "the largest device budget is" in error["message"]
    assert running_models(engine, daemon.instance) == set()
    assert daemon.chat("tiny").status_code == 200


LONG_STREAM = {
    "model": "slow",
    "stream": True,
    "max_tokens": 4000,
    "ignore_eos": True,
    "messages": [{"role": "user", "content": "count"}],
}


def one_slot(start_daemon, budget_profile, **settings):
    """Two slow models and room for one: a request for slow2 must wait while slow serves."""
    return start_daemon(
        [
            {"name": "slow", "gguf": "slow.gguf", "context_size": 4096, "preload": True},
            {"name": "slow2", "gguf": "slow2.gguf", "context_size": 4096},
        ],
        top=budget_profile(1, "slow.gguf", 4096),
        min_residency=0,
        **settings,
    )


def test_a_streaming_client_waiting_for_a_swap_gets_headers_and_keepalives_at_once(start_daemon, budget_profile):
    daemon = one_slot(start_daemon, budget_profile)
    busy = requests.post(f"{daemon.proxy_url}/chat/completions", json=LONG_STREAM, stream=True, timeout=60)
    busy_lines = busy.iter_lines()  # keep the generator: dropping it closes the connection
    assert next(busy_lines).startswith(b"data: ")

    started = time.monotonic()
    waiting = requests.post(
        f"{daemon.proxy_url}/chat/completions",
        stream=True,
        timeout=60,
        json={"model": "slow2", "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
    )
    lines = waiting.iter_lines()
    assert waiting.status_code == 200
    assert next(lines) == b": localllm: loading model slow2"
    headers_after = time.monotonic() - started
    assert daemon.model("slow")["in_flight"] == 1  # the busy model was not evicted under its client
    busy.close()
    rest = [line for line in lines if line.startswith(b"data: ")]
    assert rest[-1] == b"data: [DONE]" and len(rest) >= 2
    assert headers_after < 2.0, headers_after


def test_a_full_queue_gets_503_with_retry_after(start_daemon, budget_profile):
    daemon = one_slot(start_daemon, budget_profile, max_queue=1)
    with requests.post(f"{daemon.proxy_url}/chat/completions", json=LONG_STREAM, stream=True, timeout=60) as busy:
        busy_lines = busy.iter_lines()  # keep the generator: dropping it closes the connection
        next(busy_lines)
        with requests.post(
            f"{daemon.proxy_url}/chat/completions",
            stream=True,
            timeout=60,
            json={"model": "slow2", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        ) as queued:
            queued_lines = queued.iter_lines()
            assert next(queued_lines).startswith(b": localllm: loading")
            refused = daemon.chat("slow2")
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "queue_full"
    assert int(refused.headers["Retry-After"]) > 0


def test_idle_models_unload_after_their_ttl_but_pinned_ones_stay(start_daemon, engine):
    daemon = start_daemon(
        [
            {"name": "tiny", "gguf": "tiny.gguf", "preload": True, "ttl": "1s"},
            {"name": "tiny2", "gguf": "tiny2.gguf", "preload": True, "ttl": "1s", "pinned": True},
        ]
    )
    assert running_models(engine, daemon.instance) == {"tiny", "tiny2"}
    poll_for(lambda: running_models(engine, daemon.instance) == {"tiny2"}, timeout=10, what="tiny to unload")
    assert daemon.model("tiny")["state"] == "stopped"
    assert "idle for" in daemon.log() and "(ttl 1s)" in daemon.log()
    time.sleep(1.5)
    assert running_models(engine, daemon.instance) == {"tiny2"}


def test_a_client_that_leaves_while_queued_gives_up_its_place(start_daemon, budget_profile):
    daemon = one_slot(start_daemon, budget_profile)
    with requests.post(f"{daemon.proxy_url}/chat/completions", json=LONG_STREAM, stream=True, timeout=60) as busy:
        busy_lines = busy.iter_lines()
        next(busy_lines)
        with socket.create_connection(("127.0.0.1", int(daemon.proxy_url.split(":")[2].split("/")[0]))) as client:
            body = json.dumps({"model": "slow2", "messages": [{"role": "user", "content": "hi"}]}).encode()
            client.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            poll_for(lambda: daemon.model("slow2")["waiting"] == 1, timeout=5, what="the request to queue")
        poll_for(lambda: daemon.model("slow2")["waiting"] == 0, timeout=5, what="the queued request to leave")
    poll_for(lambda: daemon.model("slow")["in_flight"] == 0, timeout=10, what="the busy stream to end")
    time.sleep(0.5)
    assert daemon.model("slow2")["state"] == "stopped"  # nobody wants it any more: not started
    assert daemon.model("slow")["state"] == "ready"
