"""After its own crash (kill -9), localllmd adopts the containers it left: same ids, not restarted.

Containers whose config changed are recreated, those no longer wanted are removed, and a
container without our labels is never touched.
"""

from __future__ import annotations

import signal

import docker

from .conftest import (
    RUN_ID,
    TEST_RUN_LABEL,
    assert_invariants,
    our_containers,
)

TWO = [{"name": "tiny", "gguf": "tiny.gguf", "preload": True}, {"name": "tiny2", "gguf": "tiny2.gguf", "preload": True}]


def kill_9(daemon) -> None:
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(timeout=10)


def started_at(engine, container_id: str) -> str:
    return engine.api.inspect_container(container_id)["State"]["StartedAt"]


def test_kill_9_five_times_adopts_both_models_each_time(start_daemon, engine):
    daemon = start_daemon(TWO)
    before = {
        c.labels["io.localllm.model"]: (c.id, started_at(engine, c.id)) for c in our_containers(engine, daemon.instance)
    }
    assert sorted(before) == ["tiny", "tiny2"]
    for _ in range(5):
        kill_9(daemon)
        daemon = start_daemon(TWO, instance=daemon.instance)
        now = {
            c.labels["io.localllm.model"]: (c.id, started_at(engine, c.id))
            for c in our_containers(engine, daemon.instance)
        }
        assert now == before  # same containers, never restarted, no duplicates
        assert daemon.log().count("adopted running container") == 2
        assert daemon.chat("tiny").status_code == 200 and daemon.chat("tiny2").status_code == 200
        assert {m["name"]: m["state"] for m in daemon.status()["models"]} == {"tiny": "ready", "tiny2": "ready"}
        assert_invariants(daemon, engine)


def test_drifted_containers_are_recreated_and_unwanted_ones_removed(start_daemon, engine, models_dir):
    daemon = start_daemon(TWO)
    old = {c.labels["io.localllm.model"]: c.id for c in our_containers(engine, daemon.instance)}
    lookalike = engine.containers.run(
        "localllm/llama-server:0.3.36-cpu",
        ["--version"],
        name=f"localllm-{daemon.instance}-lookalike",
        labels={TEST_RUN_LABEL: RUN_ID},
        detach=True,
        network_mode="none",
    )
    kill_9(daemon)
    changed = [{"name": "tiny", "gguf": "tiny.gguf", "preload": True, "context_size": 512}]  # tiny2 is gone
    daemon = start_daemon(changed, instance=daemon.instance)
    [current] = our_containers(engine, daemon.instance)
    assert current.labels["io.localllm.model"] == "tiny" and current.id != old["tiny"]
    log = daemon.log()
    assert f"removing container localllm-{daemon.instance}-tiny-" in log and "config hash differs" in log
    assert "its model is not in the catalog" in log
    lookalike.reload()  # still there: no owner label, never touched
    assert lookalike.name == f"localllm-{daemon.instance}-lookalike"
    lookalike.remove(force=True)
    assert daemon.chat("tiny").status_code == 200
    assert_invariants(daemon, engine)


def test_a_stopped_container_of_ours_is_removed_not_adopted(start_daemon, engine):
    daemon = start_daemon(TWO[:1])
    [container] = our_containers(engine, daemon.instance)
    kill_9(daemon)
    container.stop(timeout=5)
    daemon = start_daemon(TWO[:1], instance=daemon.instance)
    [current] = our_containers(engine, daemon.instance)
    assert current.id != container.id and current.status == "running"
    try:
        engine.containers.get(container.id)
        raise AssertionError("the stopped container should be gone")
    except docker.errors.NotFound:
        pass
