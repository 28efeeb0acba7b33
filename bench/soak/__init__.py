"""A randomized fault soak: a real localllmd under steady mixed load, with faults injected at random by a seed.

    bash scripts/dev.sh soak [--minutes N] [--seed S]        (10 minutes by default)
    .venv/bin/python -m bench.soak [--minutes N] [--seed S] [--out DIR]

The pieces:
    bed.py         the test bed: generated models, a budget that holds two of them, the daemon as a subprocess
                   (started, killed with -9, restarted), the state directory on a small tmpfs, cleanup
    load.py        the client threads (streaming and not, rotating models, early disconnects) and how every
                   request ended: success, error response, error event, or a violation (hang, silent truncation)
    faults.py      the faults, each one injected, observed and, where a person would, repaired
    invariants.py  the checks after every step and the once-a-second monitor (budget, leftover containers,
                   the daemon's RSS and open file descriptors)
    report.py      bench/results/soak.md, soak.json and the hand-written soak.svg plot
    driver.py      the run: setup, baseline, the seeded schedule of faults, cool-down, report

A violation prints the seed and the step, so that ``--seed`` reproduces the same schedule of faults and targets.
"""
