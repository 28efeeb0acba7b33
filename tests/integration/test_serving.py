"""localllmd serving real llama-server containers, driven through the official openai SDK."""

from __future__ import annotations

import concurrent.futures
import signal

import openai
import pytest
import requests

from .conftest import our_containers, poll_for


def client_for(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.proxy_url, api_key="unused", max_retries=0, timeout=120)


def test_preload_then_chat_non_streaming_and_streaming(start_daemon, engine):
    daemon = start_daemon([{"name": "tiny", "aliases": ["tiny-chat"], "gguf": "tiny.gguf", "preload": True}])
    assert daemon.model("tiny")["state"] == "ready"
    client = client_for(daemon)

    assert [m.id for m in client.models.list().data] == ["tiny"]

    # Random weights sample the end-of-text token now and then: ignore_eos makes max_tokens the only end.
    reply = client.chat.completions.create(
        model="tiny", max_tokens=5, messages=[{"role": "user", "content": "hi"}], extra_body={"ignore_eos": True}
    )
    assert reply.object == "chat.completion"
    assert reply.model == "tiny"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage.completion_tokens == 5

    chunks = list(
        client.chat.completions.create(
            model="tiny-chat",
            max_tokens=6,
            stream=True,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"  # llama-server sometimes omits it; the proxy adds it
    assert chunks[-1].choices[0].finish_reason == "length"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert 1 <= len(content_chunks) <= 6  # byte tokens of a partial UTF-8 character come out merged
    assert len({c.id for c in chunks}) == 1

    [container] = our_containers(engine, daemon.instance)
    assert container.labels["io.localllm.model"] == "tiny"
    assert container.attrs["HostConfig"]["NetworkMode"] == "none"  # it listens on a socket only
    model, sockets = sorted(container.attrs["Mounts"], key=lambda m: m["Destination"])
    assert model["RW"] is False and model["Destination"] == "/models/tiny.gguf"
    assert sockets["RW"] is True and sockets["Destination"] == "/run/llama"


def test_request_for_a_stopped_model_starts_it_then_answers(start_daemon, engine):
    daemon = start_daemon(
        [
            {"name": "tiny", "gguf": "tiny.gguf", "preload": True},
            {"name": "tiny2", "aliases": ["second"], "gguf": "tiny2.gguf"},
        ]
    )
    assert daemon.model("tiny2")["state"] == "stopped"
    response = daemon.chat("second")
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "tiny2"
    assert daemon.model("tiny2")["state"] == "ready"
    assert sorted(c.labels["io.localllm.model"] for c in our_containers(engine, daemon.instance)) == ["tiny", "tiny2"]


def test_concurrent_requests_share_one_start(start_daemon, engine):
    daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf"}])
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: daemon.chat("tiny"), range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    assert len(our_containers(engine, daemon.instance)) == 1
    assert daemon.log().count("container localllm-") == 1 and daemon.log().count(" started (socket ") == 1


def test_unknown_model_gets_404_with_an_openai_error_object(start_daemon):
    daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf"}])
    with pytest.raises(openai.NotFoundError) as caught:
        client_for(daemon).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    error = caught.value.body
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "gpt-9" in error["message"] and "tiny" in error["message"]
    assert daemon.model("tiny")["state"] == "stopped"


def test_bad_requests_get_400(start_daemon):
    daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf"}])
    not_json = requests.post(
        f"{daemon.proxy_url}/chat/completions", data=b"{nope", timeout=10, headers={"Content-Type": "application/json"}
    )
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "bad_request"
    no_model = requests.post(f"{daemon.proxy_url}/chat/completions", json={"messages": []}, timeout=10)
    assert no_model.status_code == 400 and "model" in no_model.json()["error"]["message"]


def test_server_that_exits_gives_the_log_tail_while_others_keep_serving(start_daemon, engine):
    daemon = start_daemon(
        [
            {"name": "tiny", "gguf": "tiny.gguf", "preload": True},
            {"name": "broken", "gguf": "broken.gguf"},
        ]
    )
    response = daemon.chat("broken")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "model_start_failed" and "(error id " in error["message"]  # the client: no details

    status = daemon.model("broken")  # the operator: the exit code and the server's last words
    assert status["state"] == "failed" and "server exited during startup (exit code" in status["error"]
    assert "last log lines" in status["error"] and "gguf" in status["error"].lower()
    assert daemon.chat("tiny").status_code == 200
    assert [c.labels["io.localllm.model"] for c in our_containers(engine, daemon.instance)] == ["tiny"]


def test_model_file_removed_after_start_is_a_clear_error(start_daemon, models_dir, tmp_path):
    doomed = tmp_path / "doomed.gguf"
    doomed.write_bytes((models_dir / "tiny.gguf").read_bytes())
    daemon = start_daemon(
        [{"name": "tiny", "gguf": "tiny.gguf", "preload": True}, {"name": "doomed", "gguf": str(doomed)}]
    )
    doomed.unlink()
    response = daemon.chat("doomed")
    assert response.status_code == 503 and str(doomed) not in response.json()["error"]["message"]
    assert f"model file {doomed} does not exist" in daemon.model("doomed")["error"]
    assert daemon.chat("tiny").status_code == 200


def test_sigterm_stops_and_removes_every_container(start_daemon, engine):
    daemon = start_daemon(
        [
            {"name": "tiny", "gguf": "tiny.gguf", "preload": True},
            {"name": "tiny2", "gguf": "tiny2.gguf", "preload": True},
        ]
    )
    assert len([c for c in our_containers(engine, daemon.instance) if c.status == "running"]) == 2
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=60) == 0
    assert our_containers(engine, daemon.instance) == []
    assert not daemon.socket.exists()
    assert "stopped cleanly" in daemon.log()


def test_sigterm_during_a_start_cancels_it_and_leaves_nothing(start_daemon, engine):
    # The server answers under another path than the one the gate probes, so the start never completes.
    daemon = start_daemon(
        [{"name": "tiny", "gguf": "tiny.gguf", "preload": True, "extra_args": ["--api-prefix", "/elsewhere"]}],
        wait_ready=False,
    )
    daemon.wait_state("tiny", "starting")
    poll_for(lambda: our_containers(engine, daemon.instance), timeout=30, what="the container to exist")
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=60) == 0
    assert our_containers(engine, daemon.instance) == []


def test_a_server_killed_while_ready_is_reported_then_started_again(start_daemon, engine):
    daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf", "preload": True}])
    [container] = our_containers(engine, daemon.instance)
    container.kill()
    failed = daemon.chat("tiny")
    assert failed.status_code == 502 and failed.json()["error"]["code"] == "upstream_failed"
    status = daemon.model("tiny")
    assert status["state"] == "failed" and "server exited while serving (exit code 137)" in status["error"]
    assert daemon.chat("tiny").status_code == 200
    [replacement] = our_containers(engine, daemon.instance)
    assert replacement.id != container.id


def test_a_request_body_of_33_mib_is_accepted(start_daemon):
    daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf"}])
    image = "data:image/png;base64," + "A" * (33 * 1024 * 1024)
    body = {
        "model": "nope",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}],
    }
    response = requests.post(f"{daemon.proxy_url}/chat/completions", json=body, timeout=60)
    assert response.status_code == 404  # read and routed, not refused as too large (413)
    assert response.json()["error"]["code"] == "model_not_found"
