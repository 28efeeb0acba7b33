"""supervisor.fleet.adoption: the plan for the containers found, before anything is done."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from supervisor.fleet.adoption import Action, Wanted, plan
from supervisor.runtime.container_runtime import ContainerInfo


@dataclass(frozen=True)
class FakeSpec:
    digest: str

    def config_hash(self) -> str:
        return self.digest


def found(cid: str, model: str, digest: str = "h1", status: str = "running") -> ContainerInfo:
    labels = {"io.localllm.model": model, "io.localllm.config-hash": digest}
    return ContainerInfo(cid, f"c-{cid}", status, None if status == "running" else 1, False, labels)


@pytest.mark.parametrize(
    "container, wanted, action, reason",
    [
        (found("a", "tiny"), Wanted(FakeSpec("h1")), Action.ADOPT, "running, healthy-looking, with the wanted config"),
        (found("a", "tiny", "h0"), Wanted(FakeSpec("h1")), Action.RECREATE, "its config changed (config hash differs)"),
        (found("a", "gone"), Wanted(), Action.REMOVE, "its model is not in the catalog"),
        (found("a", "tiny", status="exited"), Wanted(FakeSpec("h1")), Action.REMOVE, "not running (exited)"),
        (
            found("a", "tiny"),
            Wanted(problem="its config changed (its device is not one of this host's now)"),
            Action.RECREATE,
            "its config changed (its device is not one of this host's now)",
        ),
        (
            found("a", "tiny"),
            Wanted(problem="its endpoint label is unreadable (made by an older localllm)"),
            Action.REMOVE,
            "its endpoint label is unreadable (made by an older localllm)",
        ),
    ],
    ids=["matching", "drifted", "foreign-model", "exited", "moved-device", "unreadable"],
)
def test_each_container_gets_an_action_and_its_reason(container, wanted, action, reason):
    [step] = plan([container], {container.id: wanted})
    assert (step.action, step.reason, step.model) == (action, reason, container.labels["io.localllm.model"])
    assert step.spec == (wanted.spec if action is Action.ADOPT else None)  # only an adoption carries its spec


def test_a_models_first_running_container_claims_it_and_a_second_is_removed():
    containers = [found("b", "tiny", status="exited"), found("c", "tiny"), found("d", "tiny")]
    steps = plan(containers, {c.id: Wanted(FakeSpec("h1")) for c in containers})
    assert [(s.container.id, s.action, s.reason) for s in steps] == [
        ("c", Action.ADOPT, "running, healthy-looking, with the wanted config"),
        ("d", Action.REMOVE, "a second container for the same model"),
        ("b", Action.REMOVE, "not running (exited)"),
    ]


def test_a_sweep_leaves_what_models_own_and_removes_the_rest():
    containers = [found("a", "tiny"), found("b", "tiny2"), found("c", "tiny3", status="exited")]
    steps = plan(containers, {}, owned=frozenset({"a"}), sweep_only=True)
    assert {s.container.id: (s.action, s.reason) for s in steps} == {
        "a": (Action.LEAVE, "a model owns it"),
        "b": (Action.REMOVE, "ours, but no model owns it (running)"),
        "c": (Action.REMOVE, "ours, but no model owns it (exited)"),
    }


def test_nothing_found_is_nothing_to_do():
    assert plan([], {}) == []
