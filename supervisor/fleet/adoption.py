"""What to do with the containers of ours that the engine holds: a pure plan, then its execution.

compose's idea: compare what is found with what is wanted, and say for each container what will
be done and why, before anything is done. The fleet computes, for every container it finds, the
spec that container should have (or why it cannot say: an unreadable label, a device this host no
longer has); ``plan`` turns that into steps:

- adopt: running, its model in the catalog and not yet claimed, and its config hash the wanted
  one. Its health and its room in the budget are checked when the step is carried out: a step
  that fails them becomes a removal;
- recreate: its model's config changed: removed, and the model started again;
- remove: no model owns it, it is not running, it is a second one, or it cannot be judged;
- leave: a model already owns it (the sweeps run while the daemon serves).

At start-up nothing is owned yet; the engine's return (``Fleet.reconcile``) and the shutdown
sweep pass what the running models own, and plan only removals of the rest.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from supervisor.core.containers import LABEL_CONFIG_HASH, LABEL_MODEL
from supervisor.runtime.container_runtime import ContainerInfo


class Action(enum.StrEnum):
    ADOPT = "adopt"
    RECREATE = "recreate"
    REMOVE = "remove"
    LEAVE = "leave"


@dataclass(frozen=True)
class Wanted:
    """What a found container should be: the spec its model runs with (``spec``, with ``config_hash()``),
    or why that cannot be said (``problem``). ``spec`` is None for a container of no catalog model."""

    spec: object | None = None
    problem: str | None = None


@dataclass(frozen=True)
class Step:
    container: ContainerInfo
    action: Action
    reason: str
    model: str  # the model label ("" when it has none)
    spec: object | None = None  # what an adopted container runs


def plan(
    found: list[ContainerInfo], wanted: dict[str, Wanted], owned: frozenset[str] = frozenset(), sweep_only: bool = False
) -> list[Step]:
    """The step for every found container, running ones first, each model's first one claiming it.

    ``wanted``: container id -> what it should be. ``owned``: ids a running model already holds (left
    alone). ``sweep_only``: plan no adoption (a sweep while serving): what no model owns is removed.
    """
    steps: list[Step] = []
    claimed: set[str] = set()
    for info in sorted(found, key=lambda c: (not c.running, c.labels.get(LABEL_MODEL, ""), c.name)):
        model = info.labels.get(LABEL_MODEL, "")
        if info.id in owned:
            steps.append(Step(info, Action.LEAVE, "a model owns it", model))
            continue
        if sweep_only:
            steps.append(Step(info, Action.REMOVE, f"ours, but no model owns it ({info.status})", model))
            continue
        action, reason = _judge(info, wanted.get(info.id, Wanted()), model in claimed)
        if action is Action.ADOPT:
            claimed.add(model)
        steps.append(Step(info, action, reason, model, wanted[info.id].spec if action is Action.ADOPT else None))
    return steps


def _judge(info: ContainerInfo, wanted: Wanted, claimed: bool) -> tuple[Action, str]:
    if wanted.spec is None and wanted.problem is None:
        return Action.REMOVE, "its model is not in the catalog"
    if not info.running:
        return Action.REMOVE, f"not running ({info.status})"
    if claimed:
        return Action.REMOVE, "a second container for the same model"
    if wanted.problem is not None:
        changed = wanted.problem.startswith("its config changed")
        return (Action.RECREATE if changed else Action.REMOVE), wanted.problem
    if wanted.spec.config_hash() != info.labels.get(LABEL_CONFIG_HASH):
        return Action.RECREATE, "its config changed (config hash differs)"
    return Action.ADOPT, "running, healthy-looking, with the wanted config"
