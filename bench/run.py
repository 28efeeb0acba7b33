"""Every benchmark in one go, on this machine, into one report.

    bash scripts/dev.sh bench                  (setup, then this)
    .venv/bin/python -m bench.run [--quick] [--only overhead,swap,scale] [--out DIR]

Writes DIR/report.md and DIR/report.json (default DIR: bench/results): the
machine's facts and versions, then each section's figures (min / median / max
over repeated runs, p50 / p99 for distributions) and ratios computed inside
this same run. ``--quick`` is a smoke run of seconds, for tests; its numbers
mean nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, machine_facts, remove_bench_containers

SECTIONS = {"overhead": "bench.overhead", "swap": "bench.swap_bench", "scale": "bench.scale"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds (numbers mean nothing)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run (default: {','.join(SECTIONS)})")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s): {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    command = "bash scripts/dev.sh bench" + (" --quick" if args.quick else "")
    report = {"command": command, "quick": args.quick, "machine": machine_facts(), "sections": {}, "seconds": {}}
    with tempfile.TemporaryDirectory(prefix="localllm-bench-") as tmp:
        try:
            for name in chosen:
                module = importlib.import_module(SECTIONS[name])
                workdir = Path(tmp) / name
                workdir.mkdir()
                started = time.monotonic()
                print(f"==> {name}", flush=True)
                report["sections"][name] = module.run(workdir, quick=args.quick)
                report["seconds"][name] = round(time.monotonic() - started, 1)
        finally:
            remove_bench_containers()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "report.md").write_text(render(report))
    print(render(report))
    return report


def render(report: dict) -> str:
    machine = report["machine"]
    kind = "QUICK SMOKE RUN: numbers mean nothing" if report["quick"] else "full run"
    lines = ["# localllm benchmarks", "", f"Command: `{report['command']}` ({kind})", "", "| machine | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in machine.items()]
    lines += ["", "Section run times: " + ", ".join(f"{k} {v} s" for k, v in report["seconds"].items()), ""]
    for name, result in report["sections"].items():
        module = importlib.import_module(SECTIONS[name])
        lines.append(module.render(result))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
