"""The faults: each one injected into the running bed, observed, and, where a person would, lifted or repaired.

A fault function takes the soak and the step's own seeded generator, and returns a ``Fault``: what it hit, what
happened, which models it made unavailable and from when. The driver then waits until each of those models
answers again (that time is its unavailability), and checks the invariants.

Where the soak lifts a fault itself (a deleted model file is restored), unavailability counts from the lifting;
for every other fault, from the injection. Faults that the daemon must notice by itself (a frozen server, a
paused container) are not lifted before it does, except SIGSTOP, which is lifted with SIGCONT after 1-6 s,
before or after the daemon has replaced the server.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import docker

from bench.soak.load import probe
from supervisor.fleet.liveness import ENGINE_MAX_DELAY

ENGINE_RESTART_ENV = "LOCALLLM_SOAK_ALLOW_ENGINE_RESTART"
ADOPTION_WAIT = 20.0
ENGINE_NOTICE = ENGINE_MAX_DELAY + 15.0  # the daemon's longest ping interval, and its reconcile on a busy host


@dataclass
class Fault:
    target: str
    detail: str
    affected: list[str] = field(default_factory=list)  # models whose unavailability is measured
    since: float | None = None  # when it starts (soak clock); None: no model was affected
    skipped: bool = False


def status(soak) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        return soak.bed.control.get("/status", timeout=5)
    return None


def ready_models(soak) -> dict[str, dict]:
    answer = status(soak)
    return {m["name"]: m for m in answer["models"] if m["state"] == "ready"} if answer else {}


def ready_target(soak, rng: random.Random) -> str | None:
    """A ready model, at random; if none is ready, one made ready by a request."""
    ready = sorted(ready_models(soak))
    if ready:
        return rng.choice(ready)
    name = rng.choice([m.name for m in soak.bed.models])
    ok, _ = probe(soak.bed.proxy_url, name)
    return name if ok and name in ready_models(soak) else None


def history(soak) -> list[dict]:
    done, _ = soak.bed.ctl("history", "--json", timeout=30)
    return json.loads(done.stdout) if done is not None and done.returncode == 0 else []


def planned(output: str, label: str) -> list[str]:
    """The models an apply's printed plan lists under ``label`` (replace, remove, add, keep)."""
    for line in output.splitlines():
        words = line.strip().split(None, 1)
        if len(words) == 2 and words[0] == label:
            return [name.strip() for name in words[1].split(",")]
    return []


def apply(soak, path: Path, attempts: int = 10) -> subprocess.CompletedProcess | None:
    """``localllmctl apply``; a conflict (a model starting or stopping, another apply) is tried again."""
    done = None
    for _ in range(attempts):
        done, _ = soak.bed.ctl("apply", str(path), timeout=180)
        if done is None or "try again" not in done.stderr:
            return done
        time.sleep(1.0)
    return done


# -- the daemon ---------------------------------------------------------------------------------------------


def restart_after_kill(soak, rng: random.Random, why: str) -> tuple[float, str, list[str]]:
    """kill -9 the daemon, start it again, and check that it adopted the containers of its ready models: its log
    says "adopted running container NAME" for each, and the engine says the container was not restarted. (The
    status cannot tell: the load may evict an adopted model as soon as the proxy is up.) Returns (when it was
    killed, a detail, the models that were ready)."""
    bed = soak.bed
    answer = status(soak)
    if answer is None:
        soak.note(f"kill -9 ({why}): no status just before; adoption not checked")
    before = {m["name"]: m for m in (answer or {"models": []})["models"] if m["state"] == "ready"}
    found = {}  # model -> (container name, id, StartedAt)
    for name, model in before.items():
        try:
            container = bed.container(model["container"])
            if container.status == "running":
                found[name] = (container.name, container.id, container.attrs["State"]["StartedAt"])
        except Exception as exc:
            soak.note(f"kill -9 ({why}): {name}'s container {model['container']} not inspected: {exc}")
    soak.daemon_down = True
    killed = soak.clock()
    log_offset = bed.log_size()
    bed.kill_daemon()
    if before:
        soak.begin_recovery(sorted(before), killed)
    time.sleep(rng.uniform(0.0, 1.5))
    try:
        seconds = bed.start_daemon()
    finally:
        soak.daemon_down = False
        soak.down_windows.append((killed, soak.clock() + 1.0))
    deadline = time.monotonic() + ADOPTION_WAIT
    pending, adopted = dict(found), []
    while pending and time.monotonic() < deadline:
        log = bed.log_since(log_offset, 5000)
        for name, (container_name, container_id, started) in list(pending.items()):
            if f"adopted running container {container_name}" in log:
                del pending[name]
                adopted.append(name)
                with contextlib.suppress(docker.errors.NotFound):  # gone since: evicted by the load, say
                    if bed.container(container_id).attrs["State"]["StartedAt"] != started:
                        soak.violation("adoption", f"{name}'s container {container_name} was restarted on adoption")
            elif f"removing container {container_name}:" in log:
                del pending[name]
                reason = log.split(f"removing container {container_name}:", 1)[1].splitlines()[0].strip()
                soak.violation(
                    "adoption",
                    f"after kill -9 ({why}), {name}'s container {container_name}, running and ready before, was "
                    f"removed rather than adopted: {reason}",
                )
        if pending:
            time.sleep(0.2)
    for name, (container_name, *_) in pending.items():
        soak.violation(
            "adoption",
            f"after kill -9 ({why}), the daemon's log says nothing of {name}'s container {container_name} (running "
            f"and ready before) within {ADOPTION_WAIT:g}s",
        )
    detail = f"restarted in {seconds:.2f}s, adopted {len(adopted)}/{len(found)} ({', '.join(sorted(adopted)) or '-'})"
    return killed, detail, sorted(before)


def daemon_kill9(soak, rng: random.Random) -> Fault:
    deadline = time.monotonic() + 5  # a moment when some model is ready, so that there is something to adopt
    while not ready_models(soak) and time.monotonic() < deadline:
        time.sleep(0.1)
    killed, detail, was_ready = restart_after_kill(soak, rng, "daemon_kill9")
    return Fault("localllmd", detail, was_ready, killed)


# -- containers -----------------------------------------------------------------------------------------------


def _container_fault(soak, rng: random.Random, action: str) -> Fault:
    name = ready_target(soak, rng)
    container = soak.bed.running_container_of(name) if name else None
    if container is None:
        return Fault(name or "-", "no running container to hit", skipped=True)
    at = soak.clock()
    try:
        if action == "kill":
            container.kill()
        elif action == "rm":
            container.remove(force=True)
        else:
            container.pause()
    except docker.errors.APIError as exc:
        return Fault(name, f"docker {action} failed: {exc}", skipped=True)
    return Fault(name, f"docker {action} {container.id[:12]}", [name], at)


def docker_kill(soak, rng: random.Random) -> Fault:
    return _container_fault(soak, rng, "kill")


def docker_rm(soak, rng: random.Random) -> Fault:
    return _container_fault(soak, rng, "rm")


def docker_pause(soak, rng: random.Random) -> Fault:
    return _container_fault(soak, rng, "pause")


def server_pid(container) -> int | None:
    """The host PID of the llama-server process in ``container`` (``docker top``), else its State.Pid."""
    with contextlib.suppress(docker.errors.APIError):
        top = container.top()
        pid_column, cmd_column = top["Titles"].index("PID"), top["Titles"].index("CMD")
        for row in top["Processes"]:
            if "llama-server" in row[cmd_column]:
                return int(row[pid_column])
    container.reload()
    return container.attrs["State"]["Pid"] or None


def start_time(pid: int) -> str | None:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    return None


def sigstop(soak, rng: random.Random) -> Fault:
    name = ready_target(soak, rng)
    container = soak.bed.running_container_of(name) if name else None
    pid = server_pid(container) if container else None
    if pid is None:
        return Fault(name or "-", "no llama-server process to stop", skipped=True)
    started = start_time(pid)
    hold = round(rng.uniform(1.0, 6.0), 1)
    at = soak.clock()
    os.kill(pid, signal.SIGSTOP)
    soak.begin_recovery([name], at)
    time.sleep(hold)
    resumed = started is not None and start_time(pid) == started  # the same process, not a reused PID
    if resumed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    now = soak.bed.running_container_of(name)
    replaced = now is None or now.id != container.id
    detail = f"SIGSTOP pid {pid} for {hold}s, then {'SIGCONT' if resumed else 'gone'}; replaced: {replaced}"
    return Fault(name, detail, [name], at)


# -- config changes -------------------------------------------------------------------------------------------


def _model_entry(config: dict, name: str) -> dict:
    return next(m for m in config["models"] if m["name"] == name)


def apply_good(soak, rng: random.Random) -> Fault:
    """A change that works: one model's context size, 256 <-> 512; its running container is replaced."""
    bed = soak.bed
    name = (ready_target(soak, rng) if rng.random() < 0.75 else None) or rng.choice([m.name for m in bed.models])
    was_ready = name in ready_models(soak)
    old = copy.deepcopy(bed.config)
    new = copy.deepcopy(old)
    entry = _model_entry(new, name)
    entry["context_size"] = 512 if entry.get("context_size", 256) == 256 else 256
    bed.write_main(new)
    at = soak.clock()
    log_offset = bed.log_size()
    done = apply(soak, bed.config_path)
    after = status(soak)  # at once: a model just attached stays ready for min_residency
    if done is None or done.returncode != 0:
        bed.write_main(old)
        output = "timed out" if done is None else (done.stdout[-600:] + done.stderr[-600:]).strip()
        soak.violation("apply_good", f"a good change (context_size of {name}) was not applied: {output}")
        return Fault(name, "refused", [name] if was_ready else [], at)
    gens = history(soak)
    if not gens or not (gens[-1]["status"] == "good" and gens[-1]["active"] and gens[-1]["last_good"]):
        soak.violation("apply_good", f"after a good apply, the newest generation is not active and good: {gens[-1:]}")
    discarded = [line for line in bed.log_since(log_offset, 400).splitlines() if "could not take its new" in line]
    if discarded:
        soak.violation(
            "apply_good",
            f"generation {gens[-1]['number'] if gens else '?'} was reported good, but the new container of a model "
            f"it replaced was thrown away: {discarded[-1].strip()[:300]}",
        )
    if name in planned(done.stdout, "replace") and after is not None:
        model = next(m for m in after["models"] if m["name"] == name)
        wanted = gens[-1]["hashes"].get(name) if gens else None
        if model["state"] != "ready" or model["config_hash"] != wanted:
            soak.violation(
                "apply_good",
                f"{name} was running and replaced by a good change, but right after it the model is "
                f"{model['state']} with config hash {model['config_hash']} (wanted {wanted})",
            )
    detail = f"context_size {entry['context_size']}: generation {gens[-1]['number'] if gens else '?'} good"
    return Fault(name, detail, [name] if was_ready else [], at)


def apply_bad(soak, rng: random.Random) -> Fault:
    """A change that cannot work: the gguf of every ready model (and of one more) is a broken file, so that a
    model the change replaces is running when it lands, whatever the load evicts meanwhile. It must be reverted
    to last-good, atomically."""
    bed = soak.bed
    name = ready_target(soak, rng)
    if name is None:
        return Fault("-", "no model could be made ready", skipped=True)
    broken = sorted({name, *ready_models(soak), rng.choice([m.name for m in bed.models])})
    before = history(soak)
    active = next((g["number"] for g in before if g["active"]), None)
    bad = copy.deepcopy(bed.config)
    for model in broken:
        _model_entry(bad, model)["gguf"] = str(bed.broken)
    path = bed.write_other("bad.yaml", bad)
    at = soak.clock()
    log_offset = bed.log_size()
    done = apply(soak, path)
    output = "timed out" if done is None else (done.stdout[-800:] + done.stderr[-800:]).strip()
    after = history(soak)
    now_active = next((g["number"] for g in after if g["active"]), None)
    target = ", ".join(broken)
    if done is not None and done.returncode == 0:
        gated = set(planned(done.stdout, "replace")) & set(broken)
        if gated:
            soak.violation("apply_bad", f"a broken gguf for running {sorted(gated)} passed its health gate: {output}")
        # None of them ran when it landed: only their catalog entries changed. Put the good ones back.
        again = apply(soak, bed.config_path)
        soak.note(
            f"bad apply landed as an update of stopped {target}; re-applied the good config: "
            f"{'ok' if again is not None and again.returncode == 0 else 'FAILED'}"
        )
        return Fault(target, "landed without a gate (none was running); good config re-applied", broken, at)
    if done is None or done.returncode != 1 or "reverted to last-good" not in done.stderr:
        soak.violation("apply_bad", f"a bad change was not reverted as documented (exit 1, reverted): {output}")
    elif after and after[-1]["status"] != "failed":
        soak.violation("apply_bad", f"the reverted generation is recorded as {after[-1]['status']}, not failed")
    elif now_active != active:
        soak.violation("apply_bad", f"the active generation moved from {active} to {now_active} on a failed change")
    plan = re.search(r"applying from \S+bad\.yaml: replace (\[[^\]]*\]|-)", bed.log_since(log_offset, 5000))
    replaced = plan.group(1).strip("[]").replace("'", "") if plan else "?"
    detail = f"generation {after[-1]['number'] if after else '?'} failed and was reverted (it replaced {replaced})"
    return Fault(target, detail, broken, at)


def apply_invalid(soak, rng: random.Random) -> Fault:
    """A config that is refused: a schema error (refused by localllmctl), or a change to ``daemon:`` (refused by
    the daemon, recorded as invalid). Nothing may change."""
    bed = soak.bed
    before = history(soak)
    active = next((g["number"] for g in before if g["active"]), None)
    invalid = copy.deepcopy(bed.config)
    if rng.random() < 0.5:
        kind = "schema error"
        _model_entry(invalid, rng.choice([m.name for m in bed.models]))["context_size"] = "lots"
    else:
        kind = "a daemon: change"
        invalid["daemon"]["stop_grace"] = "4s"
    path = bed.write_other("invalid.yaml", invalid)
    done = apply(soak, path)
    output = "timed out" if done is None else (done.stdout[-600:] + done.stderr[-600:]).strip()
    after = history(soak)
    now_active = next((g["number"] for g in after if g["active"]), None)
    if done is None or done.returncode != 2:
        soak.violation("apply_invalid", f"an invalid config ({kind}) was not refused with exit 2: {output}")
    elif now_active != active:
        soak.violation("apply_invalid", f"the active generation moved from {active} to {now_active}")
    return Fault("config", f"{kind}: exit {done.returncode if done else 'timeout'}")


# -- the operator ---------------------------------------------------------------------------------------------


def unload(soak, rng: random.Random) -> Fault:
    name = ready_target(soak, rng)
    if name is None:
        return Fault("-", "no model could be made ready", skipped=True)
    return operator_command(soak, "unload", name)


def load(soak, rng: random.Random) -> Fault:
    stopped = sorted(set(m.name for m in soak.bed.models) - set(ready_models(soak)))
    return operator_command(soak, "load", rng.choice(stopped or [m.name for m in soak.bed.models]))


def operator_command(soak, verb: str, name: str) -> Fault:
    """`localllmctl VERB NAME` during traffic: it must return (a hang is a violation); a failure is noted."""
    at = soak.clock()
    done, seconds = soak.bed.ctl(verb, name, timeout=120)
    if done is None:
        soak.violation("operator_hang", f"`localllmctl {verb} {name}` did not return within 120s")
        return Fault(name, "timed out", [name], at)
    said = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
    if done.returncode != 0:
        soak.note(f"{verb} {name}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
    return Fault(name, f"exit {done.returncode} in {seconds:.1f}s: {said[0][:160]}", [name], at)


# -- the host -------------------------------------------------------------------------------------------------


def fill(path: Path) -> None:
    """Write ``path`` until its file system is full, to the last byte."""
    with path.open("wb", buffering=0) as out:
        for size in (65536, 4096, 256, 16, 1):
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * size)


def full_state(soak, rng: random.Random) -> Fault:
    """The state directory fills up: an apply must be refused with nothing changed, serving goes on; half the
    time the daemon is also killed and restarted meanwhile. Then the space comes back."""
    bed = soak.bed
    if not bed.tmpfs:
        return Fault("state_dir", f"skipped: {bed.tmpfs_problem}", skipped=True)
    was_ready = sorted(ready_models(soak))
    index = bed.state_dir / "generations" / "index.json"
    before = index.read_bytes()
    filler = bed.state_dir / "soak-filler"
    at = soak.clock()
    fill(filler)
    if was_ready:
        soak.begin_recovery(was_ready, at)
    details = []
    try:
        change = copy.deepcopy(bed.config)
        entry = _model_entry(change, rng.choice([m.name for m in bed.models]))
        entry["context_size"] = 512 if entry.get("context_size", 256) == 256 else 256
        done = apply(soak, bed.write_other("while-full.yaml", change))
        output = "timed out" if done is None else (done.stdout[-600:] + done.stderr[-600:]).strip()
        if done is None or done.returncode != 1 or "nothing was changed" not in done.stderr:
            soak.violation("full_state_apply", f"an apply on a full state directory was not refused cleanly: {output}")
        elif index.read_bytes() != before:
            soak.violation("full_state_apply", "generations/index.json changed although the apply was refused")
        details.append(f"apply exit {done.returncode if done else 'timeout'}")
        if rng.random() < 0.5:
            _, restarted, _ = restart_after_kill(soak, rng, "full_state")
            details.append(f"kill -9 while full: {restarted}")
        time.sleep(rng.uniform(2.0, 4.0))
    finally:
        filler.unlink()
    return Fault("state_dir", "; ".join(details), was_ready, at)


def delete_model(soak, rng: random.Random) -> Fault:
    """A model file is deleted (for 3-5 s, while its model may have to start), then restored. If the model gave
    up meanwhile, the operator's `localllmctl load` brings it back (as the README says)."""
    bed = soak.bed
    model = rng.choice(bed.models)
    aside = bed.workdir / f"{model.name}.gguf.deleted"
    ready = ready_models(soak)
    os.replace(model.path, aside)
    how = "deleted"
    try:
        if model.name in ready and rng.random() < 0.5:
            container = bed.running_container_of(model.name)
            if container is not None:
                with contextlib.suppress(docker.errors.APIError):
                    container.kill()
                    how += f", then its container {container.id[:12]} killed"
        hold = rng.uniform(3.0, 5.0)
        end = time.monotonic() + hold
        while time.monotonic() < end:
            probe(bed.proxy_url, model.name)  # its start has to fail while the file is gone
            time.sleep(0.3)
    finally:
        os.replace(aside, model.path)
    restored = soak.clock()
    now = next((m for m in (status(soak) or {"models": []})["models"] if m["name"] == model.name), None)
    if now is not None and (now["gave_up"] or now["state"] == "failed"):
        done, _ = bed.ctl("load", model.name, timeout=120)
        state = "it gave up" if now["gave_up"] else "it was in its restart backoff"
        how += f"; {state}, and `localllmctl load` gave exit {done.returncode if done else 'timeout'}"
    return Fault(model.name, f"{how}; restored after {hold:.1f}s", [model.name], restored)


def restart_dockerd() -> None:
    """As tests/integration/test_zz_engine_restart.py restarts it: SIGTERM, then the same command line again."""
    from supervisor.runtime.images import cache_root

    pid = int(subprocess.check_output(["pgrep", "-xo", "dockerd"]).split()[0])
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            raise RuntimeError("dockerd did not stop within 60s")
        time.sleep(0.2)
    cache_root().mkdir(parents=True, exist_ok=True)
    argv = [arg.decode() for arg in command] or [shutil.which("dockerd") or "/usr/sbin/dockerd"]
    subprocess.run(["sh", "-c", f'nohup "$@" >>"{cache_root() / "dockerd.log"}" 2>&1 &', "sh", *argv], check=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect("/var/run/docker.sock")
            except OSError:
                time.sleep(0.5)
                continue
        with contextlib.suppress(docker.errors.DockerException):
            client = docker.from_env()
            try:
                if client.ping():
                    return
            finally:
                client.close()
        time.sleep(0.5)
    raise RuntimeError("dockerd did not come back within 60s")


def engine_restart(soak, rng: random.Random) -> Fault:
    """dockerd is restarted (only with LOCALLLM_SOAK_ALLOW_ENGINE_RESTART=1): our containers die with it. The
    daemon pings the engine with backoff (up to ENGINE_MAX_DELAY apart), so the leftover clock starts only once
    its log says the engine is back; it must say so within ENGINE_NOTICE of the engine answering."""
    if os.environ.get(ENGINE_RESTART_ENV) != "1":
        return Fault("dockerd", f"skipped: {ENGINE_RESTART_ENV}=1 is not set", skipped=True)
    was_ready = sorted(ready_models(soak))
    at = soak.clock()
    log_offset = soak.bed.log_size()
    soak.engine_down = soak.reconciling = True
    if was_ready:
        soak.begin_recovery(was_ready, at)
    try:
        restart_dockerd()
        soak.engine_down = False
        back = soak.clock()
        deadline = time.monotonic() + ENGINE_NOTICE
        while "Docker engine is back" not in soak.bed.log_since(log_offset, 5000):
            if time.monotonic() > deadline:
                soak.violation(
                    "engine_return", f"the daemon did not notice the engine's return within {ENGINE_NOTICE:g}s"
                )
                break
            time.sleep(0.5)
        noticed = soak.clock() - back
    finally:
        soak.engine_down = soak.reconciling = False
    return Fault("dockerd", f"engine back after {back - at:.1f}s, noticed {noticed:.1f}s later", was_ready, at)


FAULTS = {
    "daemon_kill9": daemon_kill9,
    "docker_kill": docker_kill,
    "docker_rm": docker_rm,
    "docker_pause": docker_pause,
    "sigstop": sigstop,
    "apply_good": apply_good,
    "apply_bad": apply_bad,
    "apply_invalid": apply_invalid,
    "unload": unload,
    "load": load,
    "full_state": full_state,
    "delete_model": delete_model,
    "engine_restart": engine_restart,
}
