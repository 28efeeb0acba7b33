"""Who may touch what, read from the code itself: the scheduler's state is the scheduler's (and its owner's).

Outside scheduler.py and fleet.py nothing reads or writes ``scheduler.slots``, ``.queue`` or the room
held for launches: they ask ``Scheduler.view``/``views`` and change things through its methods.
"""

from __future__ import annotations

import ast
from pathlib import Path

SUPERVISOR = Path(__file__).resolve().parents[2] / "supervisor"
OWNERS = {"scheduler.py", "fleet.py"}
PRIVATE_STATE = {"slots", "queue", "_launches"}


def touches_scheduler_state(source: str) -> list[tuple[int, str]]:
    """(line, attribute) of each ``<...>.scheduler.<state>`` or ``scheduler.<state>`` in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_STATE:
            owner = node.value
            if (isinstance(owner, ast.Attribute) and owner.attr == "scheduler") or (
                    isinstance(owner, ast.Name) and owner.id == "scheduler"):
                found.append((node.lineno, node.attr))
    return found


def test_the_check_finds_a_read_and_a_write():
    source = "x = fleet.scheduler.slots['a']\nscheduler.queue.clear()\nfleet.scheduler.view('a')\n"
    assert touches_scheduler_state(source) == [(1, "slots"), (2, "queue")]


def test_nothing_outside_the_scheduler_and_the_fleet_touches_the_schedulers_state():
    offenders = [f"{path.relative_to(SUPERVISOR)}:{line}: scheduler.{name}"
                 for path in sorted(SUPERVISOR.rglob("*.py")) if path.name not in OWNERS
                 for line, name in touches_scheduler_state(path.read_text())]
    assert offenders == []
