"""The soak run: setup, a baseline, the seeded schedule of faults under load, a cool-down, the report.

The schedule is a deck of every enabled fault kind, shuffled by the seed, dealt again and again until the time is
up. Each step has a generator of its own (seed and step number), for its targets and timings, so a step's
choices do not depend on how earlier steps went; the same ``--seed`` gives the same sequence of faults.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import statistics
import tempfile
import threading
import time
import traceback
from pathlib import Path

from bench.soak.bed import BUDGET_GIB, LIVENESS, MODEL_NEED, QUEUE_TIMEOUT, RESTART, STARTUP_TIMEOUT, Bed
from bench.soak.faults import ENGINE_RESTART_ENV, FAULTS
from bench.soak.invariants import LEFTOVER_WINDOW, SETTLE, EngineEvents, Monitor, StepChecker, fd_kinds
from bench.soak.load import READ_TIMEOUT, TOTAL_TIMEOUT, VIOLATING, Load, explain, probe, tally

RECOVERY_DEADLINE = 120.0  # a model hit by a fault must answer again within this
CLIENTS = 4
# After the load stops: RSS and fds must come back to the baseline, within these.
RSS_TOLERANCE = 0.25  # a quarter above the baseline ...
RSS_TOLERANCE_MIN_MIB = 12.0  # ... and at least this much
FD_TOLERANCE = 8
COOL_DOWN = 12.0  # seconds of no load before the end figures (the proxy's keep-alive is 5 s)
SETTLE_MAX = 90.0  # and at most this much longer while they are above the tolerance


class Soak:
    def __init__(
        self,
        seed: int,
        minutes: float,
        out: Path,
        labels: dict[str, str] | None = None,
        keep: bool = False,
        log=print,
    ):
        self.seed = seed
        self.minutes = minutes
        self.out = out
        self.keep = keep
        self.log = log
        self.started = time.monotonic()
        self.workdir = Path(tempfile.mkdtemp(prefix="localllm-soak-"))
        self.bed = Bed(self.workdir, labels, log)
        self.allow_engine_restart = os.environ.get(ENGINE_RESTART_ENV) == "1"
        self.daemon_down = False
        self.engine_down = False
        self.reconciling = False  # the engine is back, the daemon has not said so yet
        self.down_windows: list[tuple[float, float]] = []
        self.needs: dict[str, int] = {}  # model -> bytes, and device -> budget: from the monitor's last status
        self.budgets: dict[str, int] = {}
        self.violations: list[dict] = []
        self.notes: list[str] = []
        self.steps: list[dict] = []
        self.step = 0
        self.fault = "setup"
        self._lock = threading.Lock()
        self.monitor = Monitor(self)
        self.engine_events = EngineEvents(self)
        self.checker = StepChecker(self)
        self.load: Load | None = None
        self.recovering: dict[str, concurrent.futures.Future] = {}

    def clock(self) -> float:
        return time.monotonic() - self.started

    def reproduce(self) -> str:
        return f"bash scripts/dev.sh soak --seed {self.seed} --minutes {self.minutes:g}"

    def violation(self, invariant: str, message: str, log: bool = True, step: int | None = None) -> None:
        """Record and print a violation of the current step, or of ``step`` (one found after its step ended)."""
        if step is None or step == self.step:
            step, fault = self.step, self.fault
        else:
            fault = next((s["fault"] for s in self.steps if s["step"] == step), "warm-up")
        record = {
            "seed": self.seed,
            "step": step,
            "fault": fault,
            "invariant": invariant,
            "t": round(self.clock(), 1),
            "message": message,
            "log": self.bed.log_tail(25) if log else "",
        }
        with self._lock:
            self.violations.append(record)
        self.log(
            f"VIOLATION seed={self.seed} step={step} fault={fault} [{invariant}] at {record['t']}s: "
            f"{message}\n  reproduce: {self.reproduce()}\n  daemon log: {self.bed.log_path}"
        )

    def note(self, message: str) -> None:
        with self._lock:
            self.notes.append(f"step {self.step} ({self.fault}): {message}")

    # -- the run --------------------------------------------------------------------------------------------------

    def run(self) -> dict:
        self.log(f"soak: seed {self.seed}, {self.minutes:g} minute(s), work dir {self.workdir}")
        self.log(f"soak: reproduce with: {self.reproduce()}")
        error = baseline = end = None
        load_started = load_stopped = 0.0
        try:
            self.bed.prepare()
            if not self.bed.tmpfs:
                self.log(f"soak: the full-state fault is skipped: {self.bed.tmpfs_problem}")
            seconds = self.bed.start_daemon()
            self.log(f"soak: localllmd {self.bed.instance} up in {seconds:.2f}s on {self.bed.proxy_url}")
            self.monitor.start()
            self.engine_events.start()
            baseline = self.warm_up()
            self.load = Load(
                self.bed.proxy_url, [(m.name, m.weight) for m in self.bed.models], self.seed, self.clock, CLIENTS
            )
            self.load.start()
            load_started = self.clock()
            self.schedule(load_started)
            self.step, self.fault = self.step + 1, "end"
            stuck = self.load.stop()
            for name in stuck:
                self.violation("hang", f"client thread {name} still in a request {TOTAL_TIMEOUT + 10:g}s after stop")
            load_stopped = self.clock()
            end = self.cool_down(baseline)
            for invariant, message in self.checker.check():
                self.violation(invariant, message)
        except Exception as exc:
            error = f"{exc.__class__.__name__}: {exc}"
            self.log(f"soak: aborted at step {self.step} ({self.fault}): {error}\n{traceback.format_exc()}")
            self.violation("soak_aborted", error)
            load_stopped = self.clock()
        finally:
            try:
                if self.load is not None:
                    self.load.stop(timeout=5)
                for thread in (self.monitor, self.engine_events):  # the events report an episode still open
                    if thread.is_alive():
                        thread.stop()
                report = self.report(baseline, end, load_started, load_stopped, error)
            finally:
                self.bed.cleanup()
                if not self.keep and not self.violations:
                    self.bed.remove_workdir()
        from bench.soak import report as render

        render.write(report, self.out)
        self.log(render.summary(report))
        return report

    def warm_up(self) -> dict:
        """Every model answers once (so everything the daemon loads lazily is loaded), then an idle baseline."""
        self.fault = "warm-up"
        for model in self.bed.models:
            deadline = time.monotonic() + 60
            while not probe(self.bed.proxy_url, model.name)[0]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{model.name} did not answer within 60s of warm-up:\n{self.bed.log_tail()}")
                time.sleep(0.5)
        for model in self.bed.models[:2]:  # the hot ones are resident, as during the load
            probe(self.bed.proxy_url, model.name)
        for invariant, message in self.checker.check():
            self.violation(invariant, message)
        return self.figures(6.0)

    def figures(self, seconds: float) -> dict:
        """The daemon's RSS and fds: medians of the monitor's samples over the next ``seconds``."""
        since = self.clock()
        time.sleep(seconds)
        pid = self.bed.pid
        samples = [s for s in self.monitor.samples if s[0] >= since and s[1] == pid]
        if not samples:
            return {"pid": pid, "rss_mib": None, "fds": None, "samples": 0}
        return {
            "pid": pid,
            "rss_mib": round(statistics.median(s[2] for s in samples) / 1024, 1),
            "fds": int(statistics.median(s[3] for s in samples)),
            "fd_kinds": fd_kinds(pid) if pid is not None else {},
            "samples": len(samples),
        }

    def cool_down(self, baseline: dict | None) -> dict:
        """The end figures, after COOL_DOWN s of quiet; while they are above the tolerance, measured again for up to
        SETTLE_MAX s more (a dockerd restart just before the end leaves connections that close on their own)."""
        self.log(f"soak: load stopped; {COOL_DOWN:g}s of quiet before the end figures")
        time.sleep(COOL_DOWN)
        end, started = self.figures(6.0), time.monotonic()
        while baseline and not within_limits(baseline, end) and time.monotonic() - started < SETTLE_MAX:
            time.sleep(5.0)
            end = self.figures(6.0)
        end["settled_after_s"] = round(COOL_DOWN + time.monotonic() - started, 1)
        return end

    def schedule(self, load_started: float) -> None:
        kinds = [k for k in FAULTS if k != "engine_restart" or self.allow_engine_restart]
        if not self.bed.tmpfs:
            kinds.remove("full_state")
        deck_rng = random.Random(f"{self.seed}-deck")
        deadline = self.minutes * 60
        deck: list[str] = []
        while self.clock() - load_started < deadline:
            if not deck:
                deck = list(kinds)
                deck_rng.shuffle(deck)
            kind = deck.pop(0)
            self.step += 1
            self.run_step(kind, random.Random(f"{self.seed}-step-{self.step}"))

    def run_step(self, kind: str, rng: random.Random) -> None:
        self.fault = kind
        started = self.clock()
        violations_before = len(self.violations)
        self.ensure_daemon()
        self.log(f"soak: step {self.step} at {started:.0f}s: {kind}")
        try:
            fault = FAULTS[kind](self, rng)
        except Exception as exc:
            self.violation("fault_error", f"{kind} could not be carried out: {exc.__class__.__name__}: {exc}")
            self.log(traceback.format_exc())
            fault = None
        if fault is not None and fault.since is not None and fault.affected and not self.recovering:
            self.begin_recovery(fault.affected, fault.since)
        unavailable = self.finish_recovery()
        if fault is not None and fault.since is not None:
            for name, seconds in unavailable.items():
                if seconds is None:
                    self.violation(
                        "recovery",
                        f"{name} did not answer again within {RECOVERY_DEADLINE:g}s after {kind} ({fault.detail})",
                    )
        for invariant, message in self.checker.check():
            self.violation(invariant, message)
        self.repair()
        record = {
            "step": self.step,
            "t": round(started, 1),
            "fault": kind,
            "target": fault.target if fault else "-",
            "detail": fault.detail if fault else "error",
            "skipped": bool(fault and fault.skipped),
            "unavailable_s": unavailable,
            "seconds": round(self.clock() - started, 1),
            "violations": len(self.violations) - violations_before,
        }
        self.steps.append(record)
        shown = ", ".join(f"{n} {'-' if s is None else f'{s:.1f}s'}" for n, s in unavailable.items())
        self.log(f"        {record['target']}: {record['detail']}" + (f" | unavailable: {shown}" if shown else ""))
        time.sleep(rng.uniform(1.0, 3.0))

    def repair(self) -> None:
        """What an operator would do after a violation that the daemon does not undo by itself, so that later
        steps start clean (and the same violation is not counted again at every step): a degraded daemon gets the
        active config applied again; a model that gave up gets `localllmctl load`."""
        try:
            status = self.bed.control.get("/status", timeout=5)
        except (OSError, ValueError):
            return
        if status["daemon"].get("degraded"):
            done, _ = self.bed.ctl("apply", str(self.bed.config_path), timeout=180)
            self.note(f"repair: degraded, so the active config was applied again: exit {done and done.returncode}")
        for model in status["models"]:
            if model.get("gave_up"):
                done, _ = self.bed.ctl("load", model["name"], timeout=120)
                self.note(f"repair: {model['name']} had given up; `localllmctl load`: exit {done and done.returncode}")

    def ensure_daemon(self) -> None:
        """A daemon that died on its own is a violation (the checks said so); start it again to go on."""
        if self.bed.process is not None and self.bed.process.poll() is None:
            return
        self.violation("daemon_alive", f"localllmd had exited ({self.bed.process.returncode}); starting it again")
        self.daemon_down = True
        down = self.clock()
        try:
            self.bed.start_daemon()
        finally:
            self.daemon_down = False
            self.down_windows.append((down, self.clock() + 1.0))

    def begin_recovery(self, models: list[str], since: float) -> None:
        """Start asking each of ``models`` for an answer, in threads, until it gives one: its unavailability is
        the time from ``since`` to that answer. A fault that holds (a SIGSTOP, a full disk) starts this at its
        injection, so that the hold itself is measured, not assumed."""

        def until_served(name: str) -> float | None:
            deadline = time.monotonic() + RECOVERY_DEADLINE
            while time.monotonic() < deadline:
                if probe(self.bed.proxy_url, name)[0]:
                    return round(self.clock() - since, 2)
                time.sleep(0.2)
            return None

        models = [m for m in models if m not in self.recovering]  # already watched since an earlier moment
        if not models:
            return
        pool = concurrent.futures.ThreadPoolExecutor(len(models), thread_name_prefix="soak-recovery")
        self.recovering.update({name: pool.submit(until_served, name) for name in models})
        pool.shutdown(wait=False)

    def finish_recovery(self) -> dict[str, float | None]:
        """Seconds until each model of ``begin_recovery`` answered (None: not within the deadline)."""
        results = {name: future.result() for name, future in self.recovering.items()}
        self.recovering = {}
        return results

    # -- the report -----------------------------------------------------------------------------------------------

    def report(self, baseline, end, load_started: float, load_stopped: float, error: str | None = None) -> dict:
        from bench.common import machine_facts

        records = self.load.snapshot() if self.load is not None else []
        explain(records, self.down_windows)
        for record in records:
            if record.outcome in VIOLATING:
                step = self.step_at(record.started)
                self.violation(
                    f"request_{record.outcome}",
                    f"{record.kind} to {record.model} (client {record.client}, {record.started:.1f}s to "
                    f"{record.ended:.1f}s): {record.detail}",
                    log=False,
                    step=step["step"] if step else 0,
                )
        faults: dict[str, dict] = {}
        for step in self.steps:
            entry = faults.setdefault(
                step["fault"], {"count": 0, "skipped": 0, "violations": 0, "unavailable_s": [], "steps": []}
            )
            entry["count"] += 1
            entry["skipped"] += step["skipped"]
            entry["violations"] += step["violations"]
            entry["steps"].append(step["step"])
            entry["unavailable_s"] += [s for s in step["unavailable_s"].values() if s is not None]
        for entry in faults.values():
            times = entry.pop("unavailable_s")
            entry["longest_unavailable_s"] = max(times) if times else None
            entry["median_unavailable_s"] = round(statistics.median(times), 2) if times else None
        samples = self.monitor.samples
        resources = {"baseline": baseline, "end": end, "samples": samples}
        if samples:
            resources["peak"] = {
                "rss_mib": round(max(s[2] for s in samples) / 1024, 1),
                "fds": max(s[3] for s in samples),
            }
        if baseline and end and baseline["rss_mib"] is not None and end["rss_mib"] is not None:
            rss_limit, fd_limit = limits(baseline)
            resources["tolerance"] = {
                "rss": f"+{RSS_TOLERANCE:.0%} of the baseline, at least +{RSS_TOLERANCE_MIN_MIB:g} MiB",
                "rss_limit_mib": round(rss_limit, 1),
                "fds": f"+{FD_TOLERANCE}",
                "fd_limit": fd_limit,
            }
            resources["within"] = within_limits(baseline, end)
            if not resources["within"]:
                self.violation(
                    "resource_bound",
                    f"after the load stopped: RSS {end['rss_mib']} MiB (limit {rss_limit:.1f}), fds {end['fds']} "
                    f"(limit {fd_limit}); baseline {baseline['rss_mib']} MiB, {baseline['fds']} fds; "
                    f"descriptors by kind, end against baseline: {fd_growth(baseline, end)}",
                    log=False,
                )
        try:
            machine = machine_facts()
        except Exception as exc:
            machine = {"error": str(exc)}
        return {
            "seed": self.seed,
            "minutes": self.minutes,
            "command": self.reproduce(),
            "error": error,
            "machine": machine,
            "engine_restart_enabled": self.allow_engine_restart,
            "full_state_enabled": self.bed.tmpfs,
            "setup": {
                "models": [{"name": m.name, "weight": m.weight, "preload": m.preload} for m in self.bed.models],
                "memory_per_model": MODEL_NEED,
                "budget_gib": BUDGET_GIB,
                "clients": CLIENTS,
                "liveness": LIVENESS,
                "restart": RESTART,
                "queue_timeout_s": QUEUE_TIMEOUT,
                "startup_timeout_s": STARTUP_TIMEOUT,
                "client_read_timeout_s": READ_TIMEOUT,
                "client_total_timeout_s": TOTAL_TIMEOUT,
                "leftover_window_s": LEFTOVER_WINDOW,
                "engine_events": self.engine_events.events,
                "settle_s": SETTLE,
                "recovery_deadline_s": RECOVERY_DEADLINE,
                "cool_down_s": COOL_DOWN,
            },
            "load_seconds": round(load_stopped - load_started, 1),
            "duration_s": round(self.clock(), 1),
            "daemon_starts": self.bed.starts,
            "faults": faults,
            "steps": self.steps,
            "requests": tally(records),
            "violations": self.violations,
            "notes": self.notes,
            "resources": resources,
            "markers": [[s["t"], s["fault"]] for s in self.steps],
            "workdir": str(self.workdir) if (self.keep or self.violations) else None,
        }

    def step_at(self, t: float) -> dict | None:
        found = None
        for step in self.steps:
            if step["t"] <= t:
                found = step
        return found


def limits(baseline: dict) -> tuple[float, int]:
    """The RSS (MiB) and descriptor counts the daemon must be back within after the load."""
    rss = baseline["rss_mib"] + max(baseline["rss_mib"] * RSS_TOLERANCE, RSS_TOLERANCE_MIN_MIB)
    return rss, baseline["fds"] + FD_TOLERANCE


def fd_growth(baseline: dict, end: dict) -> str:
    """What kinds of descriptors the daemon has more (or fewer) of at the end: "unix to dockerd +9, ..."."""
    before, after = baseline.get("fd_kinds") or {}, end.get("fd_kinds") or {}
    changes = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(before.keys() | after.keys())}
    return ", ".join(f"{k} {v:+d}" for k, v in changes.items() if v) or "no change by kind"


def within_limits(baseline: dict, end: dict) -> bool:
    if baseline.get("rss_mib") is None or end.get("rss_mib") is None:
        return True
    rss_limit, fd_limit = limits(baseline)
    return end["rss_mib"] <= rss_limit and end["fds"] <= fd_limit
