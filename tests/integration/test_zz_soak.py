"""The fault soak, short: about two minutes of random faults under a steady mixed load (bench/soak/).

The seed changes with every run and is printed, with the command that replays it. In CI (``CI=true``) the soak
may also restart dockerd (it sets LOCALLLM_SOAK_ALLOW_ENGINE_RESTART=1 for its child); elsewhere it does so only
if whoever runs the tests set that variable. Either way it runs last: conftest moves the tests whose id says
``engine_restart`` to the end, keeping their order, and this file sorts after test_zz_engine_restart.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .conftest import RUN_ID, TEST_RUN_LABEL

ROOT = Path(__file__).resolve().parents[2]
MINUTES = 2
ENGINE_RESTART_ENV = "LOCALLLM_SOAK_ALLOW_ENGINE_RESTART"


def test_a_two_minute_soak_of_random_faults_including_an_engine_restart_in_ci(engine, tmp_path):
    seed = time.time_ns() % 1_000_000_007
    replay = f"bash scripts/dev.sh soak --seed {seed} --minutes {MINUTES}"
    print(f"soak seed {seed}; replay: {replay}")
    env = dict(os.environ)
    if os.environ.get("CI") == "true":  # CI runs everything serially: no one else's engine to disturb
        env[ENGINE_RESTART_ENV] = "1"
    log = tmp_path / "soak.log"
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "bench.soak", "--minutes", str(MINUTES), "--seed", str(seed), "--out", str(tmp_path)]
            + ["--label", f"{TEST_RUN_LABEL}={RUN_ID}"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=MINUTES * 60 + 900,  # setup, the last step, the settle and cool-down, a slow engine restart
        )
    output = log.read_text(errors="replace")
    print(output[-6000:])
    report = json.loads((tmp_path / "soak.json").read_text())
    where = f"seed {seed} (replay: {replay})"
    assert report["error"] is None, f"{where}: the soak was aborted: {report['error']}"
    outcomes = report["requests"]["by_outcome"]
    assert outcomes["silent_truncation"] == 0, f"{where}: silent truncations: {report['requests']['violating']}"
    assert outcomes["hang"] == 0, f"{where}: hangs: {report['requests']['violating']}"
    assert report["violations"] == [], f"{where}: " + "\n".join(
        f"step {v['step']} ({v['fault']}) [{v['invariant']}]: {v['message']}" for v in report["violations"]
    )
    assert done.returncode == 0, f"{where}: exit {done.returncode}\n{output[-3000:]}"
    assert outcomes["ok"] > 50 and len(report["steps"]) >= 5, f"{where}: too little happened: {report['faults']}"
