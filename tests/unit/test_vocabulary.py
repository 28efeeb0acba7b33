"""Event kinds, stop causes, generation statuses and apply steps are StrEnums whose values are the strings the event
stream, the control API and the metrics have always carried; the README documents the same strings, and no
literal elsewhere in the daemon strays from them."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from supervisor.api.metrics import APPLY_RESULTS, PER_MODEL_EVENTS, UNLOAD_CAUSES
from supervisor.core.stop_cause import StopCause
from supervisor.fleet.events import Event, EventBus, EventKind, stop_event_kind
from supervisor.fleet.rollout import ApplyStep
from supervisor.state.generations import GenerationStatus

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SOURCES = sorted((ROOT / "supervisor").rglob("*.py"))


def test_event_kinds_are_the_documented_strings():
    assert [str(kind) for kind in EventKind] == [
        "state",
        "load",
        "load_failed",
        "evict",
        "unload",
        "crash",
        "restart",
        "health_failure",
        "adopt",
        "apply",
        "rollback",
        "pull",
        "device",
        "memory_wait",
        "partial_offload",
    ]


def test_the_readme_documents_every_event_kind_and_no_other():
    section = README.split("### Events", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE)
    assert documented == [str(kind) for kind in EventKind]


def test_stop_causes_are_the_documented_strings():
    assert [str(cause) for cause in StopCause] == ["unload", "idle", "evict", "crash", "server"]


@pytest.mark.parametrize(
    "cause, kind",
    [
        (StopCause.CRASH, "crash"),
        (StopCause.EVICT, "evict"),
        (StopCause.SERVER, "evict"),
        (StopCause.UNLOAD, "unload"),
        (StopCause.IDLE, "unload"),
        ("crash", "crash"),
        ("server", "evict"),
        ("idle", "unload"),  # the plain strings the scheduler still passes
    ],
)
def test_a_stop_is_published_as_a_crash_an_eviction_or_an_unload(cause, kind):
    assert stop_event_kind(cause) is EventKind(kind)


def test_apply_statuses_are_the_documented_strings():
    section = README.split("### Events", 1)[1]
    documented = re.search(r"^\| `apply` \|.*`status`: ([a-z_, ]+) \|$", section, re.MULTILINE).group(1)
    ours = [str(s) for s in ApplyStep] + [str(s) for s in APPLY_RESULTS]
    assert sorted(documented.split(", ")) == sorted(ours)
    assert [str(s) for s in ApplyStep] == ["applying", "stopping_old", "launching", "healthy"]


def test_the_metrics_label_values_are_unchanged():
    assert list(APPLY_RESULTS) == ["good", "failed", "invalid"]
    assert list(UNLOAD_CAUSES) == ["unload", "idle"]
    assert sorted(PER_MODEL_EVENTS) == ["crash", "evict", "health_failure", "restart"]
    assert "`status` (`good`, `failed`, `invalid`)" in README and "`cause` (`idle`, `unload`, `other`)" in README


def test_an_event_with_enum_members_is_the_same_json_as_with_strings():
    bus = EventBus()
    typed = bus.publish(EventKind.UNLOAD, "idle", "m", reason="idle for 300s", cause=StopCause.IDLE)
    plain = Event(typed.id, typed.time, "unload", "m", "idle", {"reason": "idle for 300s", "cause": "idle"})
    assert json.dumps(typed.as_json()) == json.dumps(plain.as_json())
    assert f"event: {typed.kind}" == "event: unload"  # the SSE field


# -- no literal in the daemon strays from the enums


def string_constants(node: ast.AST | None) -> list[str]:
    """The strings ``node`` may evaluate to, when it is a literal (or a choice between literals)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return string_constants(node.body) + string_constants(node.orelse)
    return []


def argument(call: ast.Call, position: int, keyword: str) -> ast.AST | None:
    if len(call.args) > position:
        return call.args[position]
    return next((k.value for k in call.keywords if k.arg == keyword), None)


def calls_named(method: str) -> list[tuple[str, ast.Call]]:
    """(where, call) of each call of ``<anything>.method(...)`` or ``method(...)`` in the daemon's sources."""
    found = []
    for path in SOURCES:
        for call in ast.walk(ast.parse(path.read_text())):
            if isinstance(call, ast.Call):
                name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", None)
                if name == method:
                    found.append((f"{path.name}:{call.lineno}", call))
    return found


def literals(method: str, position: int, keyword: str) -> list[tuple[str, str]]:
    """(where, value) of each literal passed to ``<anything>.method(...)`` or ``method(...)`` at ``position``."""
    return [
        (where, value)
        for where, call in calls_named(method)
        for value in string_constants(argument(call, position, keyword))
    ]


def test_every_published_kind_is_an_event_kind_member():
    assert len(calls_named("publish")) >= 10  # the scan sees the daemon's calls
    assert literals("publish", 0, "kind") == []  # a kind is an EventKind member, never a bare string


def test_every_stop_cause_passed_is_a_stop_cause():
    causes = literals("Stop", 2, "cause") + literals("unload", 3, "cause")
    assert [(where, cause) for where, cause in causes if cause not in set(StopCause)] == []


def test_every_generation_status_marked_is_a_generation_status():
    marked = literals("mark", 1, "status")
    assert [(where, status) for where, status in marked if status not in set(GenerationStatus)] == []
