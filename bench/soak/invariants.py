"""What must hold during the soak, checked from the engine's side and from the daemon's API.

After every step (``StepChecker.check``), within a settle time:
- the daemon process is alive (unless the soak killed it);
- ``localllmctl status --check`` answers within its deadline (5 s, plus the CLI's own start-up);
- the active and last-good generations on disk parse, the last-good one is ``good``, no temp file is left;
- at most one running container with the daemon's owner label per model;
- every ready model's container is running and carries its config hash (``io.localllm.config-hash`` equals
  ``localllmctl status --json``'s ``config_hash``), and no container runs for a model that is stopped or failed;
- no container of ours is left exited, paused or created;
- the daemon is not degraded and no model has given up.

Once a second (``Monitor``), all along:
- memory accounted never above any device's budget: the sum of the needs of the ready and starting models on
  a device, from the status, is at most that device's budget;
- no container of ours stays exited, paused or created beyond the liveness window (``LEFTOVER_WINDOW``: the
  probes a busy server gets, threshold x BUSY_PATIENCE, each up to period + timeout apart, then the stop grace
  and slack for a loaded machine), counted while the daemon and the engine are up;
- the daemon's RSS (``/proc/<pid>/status`` VmRSS) and open file descriptors (``/proc/<pid>/fd``) are sampled.

At every start and death of one of our containers (``EngineEvents``, the engine's event stream), from the
engine's side alone: the declared needs of our containers holding memory on a device stay within its budget.
That sees what the status cannot: a container that a config change starts beside the others before it is any
model's, for however short a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import yaml

from bench.soak.bed import LIVENESS, STOP_GRACE
from supervisor.core.containers import LABEL_DEVICE, LABEL_MODEL, LABEL_OWNER
from supervisor.fleet.liveness import BUSY_PATIENCE

SAMPLE_PERIOD = 1.0
LEFTOVER_SLACK = 10.0
LEFTOVER_WINDOW = (
    (LIVENESS["period"] + LIVENESS["timeout"]) * LIVENESS["failure_threshold"] * BUSY_PATIENCE
    + STOP_GRACE
    + LEFTOVER_SLACK
)
HOLDING_MEMORY = ("running", "paused", "restarting")
PERSISTENT = ("degraded", "gave_up")  # states the daemon keeps until an operator acts: no settle to wait for
SETTLE = 45.0  # seconds the engine and the API get to agree after a step (a retired container drains its streams)
STATUS_CHECK_DEADLINE = 5.0
CLI_SLACK = 3.0  # localllmctl's own start-up (Python, imports) on a busy 2-core machine
LIVE_PHASES = ("ready", "starting")


def budget_problems(status: dict) -> list[str]:
    """Memory accounted above a device's budget: the needs of its ready and starting models."""
    problems = []
    for device in status.get("devices", []):
        models = [m for m in status["models"] if m["device"] == device["id"] and m["state"] in LIVE_PHASES]
        used = sum(m["memory"]["need"] for m in models)
        if used > device["budget"]:
            listed = ", ".join(f"{m['name']} {m['state']} {m['memory']['need'] / 2**30:.2f} GiB" for m in models)
            problems.append(
                f"device {device['id']}: {used / 2**30:.2f} GiB accounted, above its budget of "
                f"{device['budget'] / 2**30:.2f} GiB ({listed})"
            )
    return problems


def consistency_problems(status: dict, containers: list[dict]) -> list[tuple[str, str]]:
    """The API's view against the engine's: one running container per model, the right one, with its hash.
    Returns (invariant, message) pairs."""
    problems = []
    models = {m["name"]: m for m in status["models"]}
    running: dict[str, list[dict]] = defaultdict(list)
    for c in containers:
        model = c["Labels"].get("io.localllm.model", "?")
        if c["State"] == "running":
            running[model].append(c)
        else:
            problems.append(
                ("leftover_container", f"container {c['Id'][:12]} of {model} is {c['State']} ({c.get('Status', '')})")
            )
    for name, found in sorted(running.items()):
        ids = ", ".join(c["Id"][:12] for c in found)
        if len(found) > 1:
            problems.append(("one_container_per_model", f"{name}: {len(found)} running containers of ours: {ids}"))
        model = models.get(name)
        if model is None:
            problems.append(("engine_vs_api", f"container(s) {ids} run for {name}, which is not in the catalog"))
        elif model["state"] not in ("ready", "starting", "stopping"):
            problems.append(("engine_vs_api", f"{name} is {model['state']}, but container(s) {ids} run for it"))
    for name, model in sorted(models.items()):
        if model["state"] != "ready" or model["backend"] != "llamacpp":
            continue
        mine = [c for c in running.get(name, []) if model["container"] and c["Id"].startswith(model["container"])]
        if not mine:
            problems.append(
                ("engine_vs_api", f"{name} is ready with container {model['container']}, which is not running")
            )
        elif mine[0]["Labels"].get("io.localllm.config-hash") != model["config_hash"]:
            problems.append(
                (
                    "config_hash",
                    f"{name}'s container {model['container']} carries config hash "
                    f"{mine[0]['Labels'].get('io.localllm.config-hash')}, the status says {model['config_hash']}",
                )
            )
    if status["daemon"].get("degraded"):
        problems.append(("degraded", f"the daemon is degraded: {status['daemon']['degraded']}"))
    for name, model in sorted(models.items()):
        if model.get("gave_up"):
            problems.append(
                ("gave_up", f"{name} gave up after {model['failures']} failures: {str(model.get('error'))[:300]}")
            )
    return problems + [("memory_budget", p) for p in budget_problems(status)]


def generation_problems(state_dir: Path) -> list[str]:
    """The active and last-good generations on disk parse; the last-good one is good; no temp file is left."""
    directory = state_dir / "generations"
    try:
        index = json.loads((directory / "index.json").read_text())
    except (OSError, ValueError) as exc:
        return [f"generations/index.json does not parse: {exc}"]
    problems = []
    for role in ("active", "last_good"):
        number = index.get(role)
        if number is None:
            problems.append(f"generations/index.json has no {role} generation")
            continue
        path = directory / f"{number:06d}.yaml"
        try:
            text = yaml.safe_load(path.read_text())
            if not isinstance(text, dict) or "models" not in text:
                problems.append(f"{role} generation {path.name} is not a config")
        except (OSError, yaml.YAMLError) as exc:
            problems.append(f"{role} generation {path.name} does not parse: {exc}")
    last_good = [g for g in index.get("generations", []) if g.get("number") == index.get("last_good")]
    if last_good and last_good[0].get("status") != "good":
        problems.append(f"last-good generation {last_good[0]['number']} is {last_good[0].get('status')}")
    left = sorted(p.name for p in directory.rglob("*.tmp"))
    if left:
        problems.append(f"temp files left in generations/: {', '.join(left)}")
    return problems


def proc_sample(pid: int) -> tuple[int, int] | None:
    """(VmRSS in KiB, open file descriptors) of ``pid``, or None if it is gone."""
    try:
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
                break
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None


def fd_kinds(pid: int) -> dict[str, int]:
    """``pid``'s open descriptors by kind, from lsof (a unix socket named by the process at its other end:
    "unix to dockerd", "unix to llama-server"), so that a leak says what leaks. {} when lsof cannot tell."""
    try:
        done = subprocess.run(
            ["lsof", "+c0", "-nP", "-p", str(pid), "+E", "-F", "ftn"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    kinds: Counter[str] = Counter()
    kind, mine = None, False
    for line in done.stdout.splitlines():  # -F: "p<pid>", then per descriptor "f<fd>", "t<type>", "n<name>"
        tag, value = line[:1], line[1:]
        if tag == "p":  # +E also lists the processes at the other ends
            mine = value == str(pid)
        elif tag == "f":
            kind = "?" if mine and value.isdigit() else None
        elif tag == "t" and kind is not None:
            kind = value.lower()
        elif tag == "n" and kind is not None:
            peer = re.search(r"->INO=\d+ \d+,([^,]+),", value)
            if kind == "unix":
                kind = f"unix to {peer.group(1)}" if peer else "unix (no other process at its end)"
            elif kind in ("ipv4", "ipv6"):
                kind = "tcp listening" if "->" not in value else "tcp connection"
            kinds[kind] += 1
            kind = None
    return dict(sorted(kinds.items()))


class Monitor(threading.Thread):
    """Once a second: the daemon's RSS and fds, the budget from its status, leftovers from the engine."""

    def __init__(self, soak):
        super().__init__(name="soak-monitor", daemon=True)
        self.soak = soak
        self.samples: list[list] = []  # [t, pid, rss KiB, fds]
        self.first_seen: dict[tuple[str, str], float] = {}
        self.reported: set[tuple[str, str]] = set()
        self.budget_reported: set[str] = set()
        self.client = soak.bed.new_docker_client()
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def run(self) -> None:
        while not self._halt.wait(SAMPLE_PERIOD):
            try:
                self.sample()
            except Exception as exc:  # the monitor must outlive any one odd sample
                self.soak.note(f"monitor: {exc.__class__.__name__}: {exc}")

    def sample(self) -> None:
        soak, bed = self.soak, self.soak.bed
        now = soak.clock()
        pid = bed.pid
        if pid is not None:
            usage = proc_sample(pid)
            if usage is not None:
                self.samples.append([round(now, 2), pid, usage[0], usage[1]])
        status = None
        if pid is not None and not soak.daemon_down:
            with contextlib.suppress(OSError, ValueError):
                status = bed.control.get("/status", timeout=5)
        if status is not None:
            soak.needs = {m["name"]: m["memory"]["need"] for m in status["models"]}
            soak.budgets = {d["id"]: d["budget"] for d in status["devices"]}
            for problem in budget_problems(status):
                if problem not in self.budget_reported:
                    self.budget_reported.add(problem)
                    soak.violation("memory_budget", problem)
        containers = None
        if not soak.engine_down:
            with contextlib.suppress(Exception):
                containers = bed.containers(self.client)
        if containers is None:
            return
        paused_clock = soak.daemon_down or soak.engine_down or soak.reconciling or pid is None
        seen = set()
        for c in containers:
            if c["State"] == "running":
                continue
            key = (c["Id"], c["State"])
            seen.add(key)
            first = self.first_seen.setdefault(key, now)
            if paused_clock:
                self.first_seen[key] = now
                continue
            if now - first > LEFTOVER_WINDOW and key not in self.reported:
                self.reported.add(key)
                soak.violation(
                    "leftover_container",
                    f"container {c['Id'][:12]} of {c['Labels'].get('io.localllm.model')} has been {c['State']} "
                    f"for {now - first:.0f}s, beyond the liveness window of {LEFTOVER_WINDOW:g}s ({c.get('Status')})",
                )
        for key in list(self.first_seen):
            if key not in seen:
                del self.first_seen[key]


class EngineEvents(threading.Thread):
    """The engine's own event stream for our containers (start, die, destroy): which of them hold memory (from
    their start until they die; a paused one still holds it), per device, against the device's budget. Every
    change is checked, so no overlap is too short to be seen, however brief; needs and budgets come from the
    monitor's last status. After a break (the engine restarted) it lists our containers again and replays the
    events since just before that list, checking only those after it."""

    def __init__(self, soak):
        super().__init__(name="soak-engine-events", daemon=True)
        self.soak = soak
        self.client = soak.bed.new_docker_client()
        self.events = 0
        self.holding: dict[str, tuple[str, str]] = {}  # container id -> (model, device)
        self.over: dict[str, tuple[float, int, str]] = {}  # device -> (since, step, what) while above budget
        self._stream = None
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        with contextlib.suppress(Exception):
            if self._stream is not None:
                self._stream.close()
        self.join(10)
        for device in list(self.over):
            self._report(device, self.soak.clock())

    def run(self) -> None:
        owner = f"{LABEL_OWNER}={self.soak.bed.instance}"
        while not self._halt.is_set():
            if self.soak.engine_down:
                self._halt.wait(0.5)
                continue
            try:
                since = time.time() - 1
                listed = self.client.api.containers(all=True, filters={"label": owner})
                listed_at = time.time_ns()
                self.holding = {
                    c["Id"]: (c["Labels"].get(LABEL_MODEL, "?"), c["Labels"].get(LABEL_DEVICE, "cpu"))
                    for c in listed
                    if c["State"] in HOLDING_MEMORY
                }
                self._stream = self.client.events(
                    since=int(since), decode=True, filters={"type": "container", "label": owner}
                )
                for event in self._stream:
                    self._event(event, listed_at)
            except Exception:
                if not self._halt.is_set():
                    self._halt.wait(0.5)

    def _event(self, event: dict, listed_at: int) -> None:
        action = event.get("Action") or event.get("status") or ""
        container = event.get("id") or event.get("Actor", {}).get("ID", "")
        labels = event.get("Actor", {}).get("Attributes", {})
        if action == "start":
            self.holding[container] = (labels.get(LABEL_MODEL, "?"), labels.get(LABEL_DEVICE, "cpu"))
        elif action in ("die", "destroy"):
            self.holding.pop(container, None)
        else:
            return
        self.events += 1
        if event.get("timeNano", 0) > listed_at:
            self._check(event.get("timeNano", 0) / 1e9)

    def _check(self, at: float) -> None:
        soak = self.soak
        if not soak.needs:
            return
        now = soak.clock() - (time.time() - at)  # the event's moment on the soak's clock
        per_device: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for container, (model, device) in self.holding.items():
            per_device[device].append((model, container[:12]))
        for device in set(per_device) | set(self.over):
            found = per_device.get(device, [])
            total, budget = sum(soak.needs.get(m, 0) for m, _ in found), soak.budgets.get(device)
            if budget is not None and total > budget:
                what = ", ".join(f"{m} {c}" for m, c in sorted(found))
                what = f"{len(found)} containers holding {total / 2**30:.2f} GiB, budget {budget / 2**30:.2f}: {what}"
                since, step, _ = self.over.get(device, (now, soak.step, ""))
                self.over[device] = (since, step, what)  # the fullest moment is the last one kept
            elif device in self.over:
                self._report(device, now)

    def _report(self, device: str, until: float) -> None:
        since, step, what = self.over.pop(device)
        self.soak.violation(
            "memory_budget_engine",
            f"device {device}: from {since:.2f}s to {until:.2f}s of the run ({(until - since) * 1000:.0f} ms), "
            f"by the engine's events: {what}",
            step=step,
        )


class StepChecker:
    """The checks after a step, given the settle time to agree."""

    def __init__(self, soak):
        self.soak = soak

    def check(self) -> list[tuple[str, str]]:
        """Returns (invariant, message) for each failed one."""
        soak, bed = self.soak, self.soak.bed
        failed: list[tuple[str, str]] = []
        if bed.process is None or bed.process.poll() is not None:
            code = None if bed.process is None else bed.process.returncode
            return [("daemon_alive", f"localllmd is not running (exit status {code})")]
        done, seconds = bed.ctl("status", "--check", timeout=STATUS_CHECK_DEADLINE + 30)
        if done is None or seconds > STATUS_CHECK_DEADLINE + CLI_SLACK:
            failed.append(("status_check", f"`localllmctl status --check` took {seconds:.1f}s"))
        elif done.returncode not in (0, 1) or "unresponsive" in done.stdout + done.stderr:
            failed.append(
                ("status_check", f"`status --check` exited {done.returncode}: {(done.stdout + done.stderr).strip()}")
            )
        elif done.returncode == 1:
            soak.note(f"status --check: {(done.stdout + done.stderr).strip()[:300]}")
        deadline = time.monotonic() + SETTLE
        while True:
            problems = [("generations", p) for p in generation_problems(bed.state_dir)]
            done, _ = bed.ctl("status", "--json", timeout=30)
            if done is None or done.returncode != 0:
                reason = "timeout" if done is None else done.stderr.strip()
                problems.append(("status_json", f"`status --json` failed: {reason}"))
            else:
                try:
                    problems += consistency_problems(json.loads(done.stdout), bed.containers())
                except Exception as exc:
                    problems.append(("engine_vs_api", f"cannot compare: {exc.__class__.__name__}: {exc}"))
            if all(invariant in PERSISTENT for invariant, _ in problems) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        by_invariant: dict[str, list[str]] = defaultdict(list)
        for invariant, message in problems:
            by_invariant[invariant].append(message)
        for invariant, messages in by_invariant.items():
            when = "" if invariant in PERSISTENT else f"still after a {SETTLE:g}s settle: "
            failed.append((invariant, when + "; ".join(messages)))
        return failed
