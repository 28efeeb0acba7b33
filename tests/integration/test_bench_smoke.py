"""The benchmark command runs end to end (a quick smoke run: its numbers mean nothing, they are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_bench_command_writes_a_report(tmp_path, engine):
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["sections"]) == {"overhead", "swap", "scale"}
    assert report["machine"]["cpus"] >= 1 and report["quick"] is True
    markdown = (tmp_path / "report.md").read_text()
    assert "QUICK SMOKE RUN" in markdown
    leftovers = engine.containers.list(all=True, filters={"label": "io.localllm.bench"})
    assert leftovers == [], [c.name for c in leftovers]
