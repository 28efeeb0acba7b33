"""python -m bench.soak [--minutes N] [--seed S] [--out DIR] [--label K=V] [--keep]

Exit status: 0 with no invariant violation, 1 with any (each printed with its seed and step), 2 on bad arguments.
The dockerd-restart fault runs only when LOCALLLM_SOAK_ALLOW_ENGINE_RESTART=1 is set.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.common import ROOT
from bench.soak.driver import Soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.soak", description="a randomized fault soak of localllmd")
    parser.add_argument("--minutes", type=float, default=10.0, help="minutes of faults under load (default 10)")
    parser.add_argument("--seed", type=int, help="the seed of the schedule (default: from the time, printed)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where soak.md/.json/.svg go")
    parser.add_argument("--label", action="append", default=[], help="an extra label on every container, K=V")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) even without violations")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be above 0")
    labels = {}
    for label in args.label:
        key, sep, value = label.partition("=")
        if not sep or not key:
            parser.error(f"--label {label!r}: expected K=V")
        labels[key] = value
    seed = args.seed if args.seed is not None else int(time.time())
    report = Soak(seed, args.minutes, args.out, labels, args.keep, log=lambda line: print(line, flush=True)).run()
    return 1 if report["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
