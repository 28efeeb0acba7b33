"""Config generations on the real engine: apply, health gate, automatic rollback, history, degraded."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import requests
import yaml

from .conftest import assert_invariants, executable, free_tcp_port, our_containers, poll_for

LONG = {"stream": True, "max_tokens": 1500, "ignore_eos": True, "messages": [{"role": "user", "content": "count"}]}


def ctl(daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [executable("localllmctl"), "--socket", str(daemon.socket), *args], capture_output=True, text=True, timeout=120
    )


def write_config(daemon, tmp_path, name: str, change) -> str:
    """The daemon's config with ``change(config)`` applied, written as a new file."""
    config = yaml.safe_load(daemon.config_path.read_text())
    change(config)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def model(config: dict, name: str) -> dict:
    return next(m for m in config["models"] if m["name"] == name)


def history(daemon) -> list[dict]:
    return json.loads(ctl(daemon, "history", "--json").stdout)


class Streamer(threading.Thread):
    """A client streaming a long answer in the background; remembers how the stream ended."""

    def __init__(self, daemon, name: str):
        super().__init__(daemon=True)
        self.url, self.body, self.lines, self.error = (
            f"{daemon.proxy_url}/chat/completions",
            {"model": name, **LONG},
            [],
            None,
        )
        self.started_streaming = threading.Event()

    def run(self) -> None:
        try:
            with requests.post(self.url, json=self.body, stream=True, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith(b"data: "):
                        self.lines.append(line)
                        self.started_streaming.set()
        except requests.RequestException as exc:
            self.error = exc

    @property
    def completed(self) -> bool:
        return self.error is None and self.lines[-1] == b"data: [DONE]" and b'"error"' not in b"".join(self.lines)


def test_a_good_change_replaces_only_the_changed_container_without_interrupting_a_stream(
    start_daemon, engine, tmp_path
):
    daemon = start_daemon(
        [
            {"name": "slow", "gguf": "slow.gguf", "context_size": 2048, "preload": True},
            {"name": "tiny", "gguf": "tiny.gguf", "preload": True},
        ]
    )
    before = {c.labels["io.localllm.model"]: c.id for c in our_containers(engine, daemon.instance)}
    streamer = Streamer(daemon, "slow")
    streamer.start()
    assert streamer.started_streaming.wait(30)
    path = write_config(daemon, tmp_path, "bigger.yaml", lambda c: model(c, "slow").update(context_size=4096))
    done = ctl(daemon, "apply", path)
    assert done.returncode == 0, done.stderr
    assert "replace  slow" in done.stdout and ": good" in done.stdout
    streamer.join(60)
    assert streamer.completed, streamer.lines[-2:]
    poll_for(
        lambda: before["slow"] not in [c.id for c in our_containers(engine, daemon.instance)],
        timeout=30,
        what="the old container to be retired once its stream ended",
    )
    after = {c.labels["io.localllm.model"]: c.id for c in our_containers(engine, daemon.instance)}
    assert after["tiny"] == before["tiny"] and after["slow"] != before["slow"] and len(after) == 2
    assert daemon.chat("slow").status_code == 200
    [*_, last] = history(daemon)
    assert last["status"] == "good" and last["active"] and last["last_good"]
    assert_invariants(daemon, engine)


def test_bad_changes_are_reverted_recorded_and_never_interrupt_serving(start_daemon, engine, tmp_path):
    daemon = start_daemon([{"name": "slow", "gguf": "slow.gguf", "context_size": 2048, "preload": True}])
    [original] = our_containers(engine, daemon.instance)
    bad_changes = {
        "bad-argument": lambda c: model(c, "slow").update(extra_args=["--no-such-flag"]),
        "missing-image": lambda c: model(c, "slow").update(image="localllm/llama-server:0.0.0-cpu"),
    }
    for name, change in bad_changes.items():
        streamer = Streamer(daemon, "slow")
        streamer.start()
        assert streamer.started_streaming.wait(30)
        done = ctl(daemon, "apply", write_config(daemon, tmp_path, f"{name}.yaml", change))
        assert done.returncode == 1, (name, done.stdout, done.stderr)
        assert "reverted to last-good" in done.stderr
        streamer.join(60)
        assert streamer.completed, (name, streamer.lines[-2:])
        assert [c.id for c in our_containers(engine, daemon.instance)] == [original.id]
        assert daemon.chat("slow").status_code == 200
        assert history(daemon)[-1]["status"] == "failed"
    missing_file = write_config(
        daemon, tmp_path, "missing-file.yaml", lambda c: model(c, "slow").update(gguf=str(tmp_path / "nowhere.gguf"))
    )
    done = ctl(daemon, "apply", missing_file)  # refused by the daemon's validation, recorded as invalid
    assert done.returncode == 2 and f"{missing_file}:" in done.stderr and "nowhere.gguf does not exist" in done.stderr
    assert history(daemon)[-1]["status"] == "invalid"
    last_good = [g for g in history(daemon) if g["last_good"]]
    assert len(last_good) == 1 and last_good[0]["source"].startswith("startup")
    assert_invariants(daemon, engine)


def test_an_invalid_config_sent_to_the_daemon_is_recorded_as_invalid(start_daemon, tmp_path):
    daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf", "preload": True}])
    path = write_config(daemon, tmp_path, "other-port.yaml", lambda c: c["daemon"].update(stop_grace=3))
    done = ctl(daemon, "apply", path)
    assert done.returncode == 2 and "only a restart of localllmd applies" in done.stderr
    assert history(daemon)[-1]["status"] == "invalid"


def test_when_last_good_cannot_come_back_the_daemon_is_degraded_and_does_not_loop(
    start_daemon, engine, models_dir, tmp_path
):
    own = tmp_path / "own.gguf"
    own.write_bytes((models_dir / "tiny.gguf").read_bytes())
    daemon = start_daemon(
        [{"name": "tiny", "gguf": str(own), "preload": True}], top=one_model_budget(tmp_path, models_dir)
    )
    own.unlink()  # the running container keeps its mount; a restart of the last-good spec cannot work
    bad = write_config(
        daemon,
        tmp_path,
        "bad.yaml",
        lambda c: model(c, "tiny").update(gguf=str(models_dir / "tiny.gguf"), extra_args=["--no-such-flag"]),
    )
    done = ctl(daemon, "apply", bad)
    assert done.returncode == 1 and "DEGRADED" in done.stderr
    status = json.loads(ctl(daemon, "status", "--json").stdout)
    assert "could not be brought back" in status["daemon"]["degraded"]
    assert "DEGRADED:" in ctl(daemon, "status").stdout
    starts = daemon.log().count(" started (socket ")
    time.sleep(3)
    assert our_containers(engine, daemon.instance) == []
    assert daemon.log().count(" started (socket ") == starts  # nothing restarts it on its own


def one_model_budget(tmp_path, models_dir) -> dict:
    """A CPU profile with room for one tiny model only, so a change must stop the old container first."""
    from supervisor.config.profiles import builtin_profiles_dir, load_profiles
    from supervisor.config.settings import ModelEntry
    from supervisor.fleet.sizing import size_model

    need = size_model(
        ModelEntry(name="m", gguf=models_dir / "tiny.gguf", context_size=256), load_profiles()["cpu-only"]
    ).need
    profile = yaml.safe_load((builtin_profiles_dir() / "cpu-only.yaml").read_text())
    profile.update(name="one-model")
    profile["hardware"]["ram_gib"] = 1.5 * need / 1024**3
    profile["defaults"]["ram_reserve_gib"] = 0
    directory = tmp_path / "profiles"
    directory.mkdir(exist_ok=True)
    (directory / "one-model.yaml").write_text(yaml.safe_dump(profile))
    return {"profile": "one-model", "profiles_dir": str(directory)}


def test_rollback_returns_to_an_earlier_generation(start_daemon, engine, tmp_path):
    daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf", "preload": True}])
    [first] = our_containers(engine, daemon.instance)
    assert (
        ctl(
            daemon,
            "apply",
            write_config(daemon, tmp_path, "c512.yaml", lambda c: model(c, "tiny").update(context_size=512)),
        ).returncode
        == 0
    )
    poll_for(
        lambda: first.id not in [c.id for c in our_containers(engine, daemon.instance)],
        timeout=30,
        what="the first container to be retired",
    )
    done = ctl(daemon, "rollback")
    assert done.returncode == 0, done.stderr
    assert "rollback to generation 1" in done.stdout and ": good" in done.stdout
    serving = daemon.model("tiny")["container"]
    [current] = [c for c in our_containers(engine, daemon.instance) if c.id.startswith(serving)]
    assert "256" in current.attrs["Args"][current.attrs["Args"].index("--ctx-size") + 1]
    table = ctl(daemon, "history").stdout
    assert "startup" in table and "rollback to generation 1" in table and "*active" in table
    poll_for(lambda: len(our_containers(engine, daemon.instance)) == 1, timeout=30, what="the retired one to go")
    assert_invariants(daemon, engine)


def test_a_corrupt_state_file_is_set_aside_and_the_containers_are_adopted(start_daemon, engine):
    daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf", "preload": True}])
    [container] = our_containers(engine, daemon.instance)
    state_dir = daemon.socket.parent
    daemon.process.kill()
    daemon.process.wait(timeout=10)
    index = state_dir / "generations" / "index.json"
    index.write_text("{ this is not json")
    config = yaml.safe_load(daemon.config_path.read_text())
    again = start_daemon(
        [{"name": "tiny", "gguf": "tiny.gguf", "preload": True}],
        instance=daemon.instance,
        state_dir=config["daemon"]["state_dir"],
    )
    assert [c.id for c in our_containers(engine, again.instance)] == [container.id]
    [aside] = list((state_dir / "generations").glob("index.json.corrupt-*"))
    assert aside.read_text() == "{ this is not json"
    assert "generation index" in again.log() and "was unreadable" in again.log()
    assert again.chat("tiny").status_code == 200
    assert [g["source"][:7] for g in history(again)] == ["startup"]
    assert_invariants(again, engine)


def test_a_full_state_directory_refuses_apply_cleanly_and_keeps_the_old_state(start_daemon, tmp_path):
    state_dir = tmp_path / "small-state"
    state_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(state_dir)], check=True)
    try:
        daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf", "preload": True}], state_dir=str(state_dir))
        poll_for(
            lambda: history(daemon) and history(daemon)[0]["status"] == "good",
            timeout=10,
            what="the startup generation to be good",
        )
        index = state_dir / "generations" / "index.json"
        before = index.read_bytes()
        filler = state_dir / "filler"
        with filler.open("wb", buffering=0) as out:  # fill the tmpfs to the last byte
            for size in (65536, 4096, 256, 16, 1):
                try:
                    while True:
                        out.write(b"\0" * size)
                except OSError:
                    pass
        done = ctl(
            daemon,
            "apply",
            write_config(daemon, tmp_path, "c512.yaml", lambda c: model(c, "tiny").update(context_size=512)),
        )
        assert done.returncode == 1, done.stdout + done.stderr
        assert "cannot write" in done.stderr and "nothing was changed" in done.stderr
        assert index.read_bytes() == before
        assert not list((state_dir / "generations").glob("*.tmp"))
        assert sorted(p.name for p in (state_dir / "generations").glob("0*.yaml")) == ["000001.yaml"]
        assert daemon.chat("tiny").status_code == 200
        filler.unlink()
        daemon.terminate()
    finally:
        subprocess.run(["umount", "-l", str(state_dir)], check=False)


def test_sighup_re_reads_the_config_file_and_applies_it(start_daemon, engine):
    daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf", "preload": True}])
    config = yaml.safe_load(daemon.config_path.read_text())
    model(config, "tiny")["context_size"] = 512
    daemon.config_path.write_text(yaml.safe_dump(config))
    daemon.process.send_signal(signal.SIGHUP)
    poll_for(
        lambda: len(history(daemon)) == 2 and history(daemon)[-1]["status"] == "good",
        timeout=30,
        what="the SIGHUP generation",
    )
    assert history(daemon)[-1]["source"] == f"sighup: {daemon.config_path}"
    poll_for(lambda: len(our_containers(engine, daemon.instance)) == 1, timeout=30, what="the old one to retire")
    [container] = our_containers(engine, daemon.instance)
    assert container.attrs["Args"][container.attrs["Args"].index("--ctx-size") + 1] == "512"
    assert_invariants(daemon, engine)


def test_without_room_for_both_the_old_container_stops_first_and_the_change_still_lands(
    start_daemon, engine, models_dir, tmp_path
):
    daemon = start_daemon(
        [{"name": "tiny", "gguf": "tiny.gguf", "preload": True}], top=one_model_budget(tmp_path, models_dir)
    )
    [old] = our_containers(engine, daemon.instance)
    done = ctl(
        daemon,
        "apply",
        write_config(daemon, tmp_path, "args.yaml", lambda c: model(c, "tiny").update(extra_args=["--threads", "1"])),
    )
    assert done.returncode == 0, done.stderr
    assert "no room for both, stopping the old one first" in daemon.log()
    [new] = our_containers(engine, daemon.instance)
    assert new.id != old.id and "--threads" in new.attrs["Args"]
    assert daemon.chat("tiny").status_code == 200
    assert_invariants(daemon, engine)


API_KEY = "proxy-key-0123456789abcdef0123456789abcdef"
CONTROL_TOKEN = "control-token-0123456789abcdef0123456789"


def test_stored_generations_hold_no_secret_and_a_rollback_gets_them_back(start_daemon, engine, tmp_path):
    daemon = start_daemon(
        [{"name": "tiny", "gguf": "tiny.gguf", "preload": True}],
        api_keys=[API_KEY],
        control_listen=f"127.0.0.1:{free_tcp_port()}",
        control_token=CONTROL_TOKEN,
    )
    config = yaml.safe_load(daemon.config_path.read_text())
    model(config, "tiny").update(context_size=512)
    changed = tmp_path / "c512.yaml"  # the daemon section last: the diff shows all of it
    changed.write_text(
        yaml.safe_dump({k: config[k] for k in sorted(config, key=lambda k: k == "daemon")}, sort_keys=False)
    )
    preview = ctl(daemon, "apply", str(changed))
    assert preview.returncode == 0, preview.stderr
    assert '   api_keys:\n   - "<redacted>"\n' in preview.stderr, preview.stderr
    assert API_KEY not in preview.stderr and CONTROL_TOKEN not in preview.stderr  # the diff a viewer may ask for
    done = ctl(daemon, "rollback", "1")
    assert done.returncode == 0, done.stderr  # the daemon section, secrets included, is the running one's
    assert [g["status"] for g in history(daemon)] == ["good", "good", "good"]
    directory = daemon.socket.parent / "generations"
    stored = {p.relative_to(directory): p for p in directory.rglob("*") if p.is_file()}
    assert {p.stat().st_mode & 0o777 for p in stored.values()} == {0o600}
    kept_apart = {name for name, p in stored.items() if API_KEY in p.read_text() or CONTROL_TOKEN in p.read_text()}
    assert {str(name) for name in kept_apart} == {"secrets/000001.json", "secrets/000002.json", "secrets/000003.json"}
    assert daemon.chat("tiny").status_code == 401
    answer = requests.post(
        f"{daemon.proxy_url}/chat/completions",
        timeout=60,
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert answer.status_code == 200
    assert_invariants(daemon, engine)


def test_a_rollback_reads_relative_paths_against_the_file_the_generation_came_from(start_daemon, tmp_path):
    (tmp_path / "extra-profiles").mkdir()
    daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf"}], top={"profiles_dir": "extra-profiles"})
    for name, context in (("c320.yaml", 320), ("c384.yaml", 384)):
        changed = write_config(daemon, tmp_path, name, lambda c, n=context: model(c, "tiny").update(context_size=n))
        assert ctl(daemon, "apply", changed).returncode == 0
    done = ctl(daemon, "rollback", "2")  # not from the generations' directory, where extra-profiles is not
    assert done.returncode == 0, done.stderr
    assert [g["status"] for g in history(daemon)][1:] == ["good", "good", "good"]
    assert history(daemon)[-1]["path"] == str(tmp_path / "c320.yaml")
