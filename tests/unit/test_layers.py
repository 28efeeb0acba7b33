"""Who may touch what, read from the code itself: the scheduler's state is the scheduler's (and its owner's).

Outside core/scheduler.py and fleet/owner.py nothing reads or writes ``scheduler.slots``, ``.queue`` or the room
held for launches: they ask ``Scheduler.view``/``views`` and change things through its methods.
"""

from __future__ import annotations

import ast
from pathlib import Path

SUPERVISOR = Path(__file__).resolve().parents[2] / "supervisor"
OWNERS = {"core/scheduler.py", "fleet/owner.py"}
PRIVATE_STATE = {"slots", "queue", "_launches"}


def touches_scheduler_state(source: str) -> list[tuple[int, str]]:
    """(line, attribute) of each ``<...>.scheduler.<state>`` or ``scheduler.<state>`` in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_STATE:
            owner = node.value
            if (isinstance(owner, ast.Attribute) and owner.attr == "scheduler") or (
                isinstance(owner, ast.Name) and owner.id == "scheduler"
            ):
                found.append((node.lineno, node.attr))
    return found


def test_the_check_finds_a_read_and_a_write():
    source = "x = fleet.scheduler.slots['a']\nscheduler.queue.clear()\nfleet.scheduler.view('a')\n"
    assert touches_scheduler_state(source) == [(1, "slots"), (2, "queue")]


def test_nothing_outside_the_scheduler_and_the_fleet_touches_the_schedulers_state():
    offenders = [
        f"{path.relative_to(SUPERVISOR)}:{line}: scheduler.{name}"
        for path in sorted(SUPERVISOR.rglob("*.py"))
        if path.relative_to(SUPERVISOR).as_posix() not in OWNERS
        for line, name in touches_scheduler_state(path.read_text())
    ]
    assert offenders == []


# -- the layers' import rules ------------------------------------------------------------------------------------

# layer -> the layers it must never import (see supervisor/DESIGN.md)
FORBIDDEN = {
    "core": {"runtime", "state", "fleet", "api", "cli", "daemon"},
    "config": {"runtime", "state", "fleet", "api", "cli", "daemon"},
    "runtime": {"state", "fleet", "api", "cli", "daemon"},
    "state": {"runtime", "fleet", "api", "cli", "daemon"},
    "fleet": {"api", "cli", "daemon"},
    "api": {"runtime", "cli", "daemon"},
    "cli": {"api", "daemon"},  # offline commands size models as the fleet does (fleet/sizing.py)
}


def layer_of(module: str) -> str | None:
    """``supervisor.core.scheduler`` -> ``core``; ``supervisor.daemon`` -> ``daemon``; others -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "supervisor" else None


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``source``, the module named ``module``; type-only imports too."""
    found = []
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]  # from pkg import module
    return found


def broken_rules(source: str, module: str) -> list[str]:
    """Each import of ``module``'s source that its layer may not make, as ``line: layer -> layer (module)``."""
    layer = layer_of(module)
    problems = []
    for line, target in imported_modules(source, module):
        other = layer_of(target)
        if other in FORBIDDEN.get(layer or "", ()):
            problems.append(f"{line}: {layer} -> {other}")
    return sorted(set(problems))


def test_the_import_check_catches_each_kind_of_import():
    source = (
        "from supervisor.runtime.docker_runtime import DockerRuntime\n"
        "from supervisor.fleet import owner\n"
        "from ..api import proxy\n"
        "import supervisor.cli.ctl\n"
        "if TYPE_CHECKING:\n    from supervisor.state.learned import LearnedSizes\n"
        "from supervisor.config.settings import Config\n"
    )
    assert broken_rules(source, "supervisor.core.scheduler") == [
        "1: core -> runtime",
        "2: core -> fleet",
        "3: core -> api",
        "4: core -> cli",
        "6: core -> state",
    ]
    assert broken_rules(source, "supervisor.fleet.owner") == ["3: fleet -> api", "4: fleet -> cli"]
    assert broken_rules(source, "supervisor.api.proxy") == ["1: api -> runtime", "4: api -> cli"]


def test_every_module_keeps_its_layers_import_rules():
    modules = {
        path: "supervisor." + ".".join(path.relative_to(SUPERVISOR).with_suffix("").parts)
        for path in sorted(SUPERVISOR.rglob("*.py"))
    }
    assert {layer_of(m) for m in modules.values()} - {"__init__", "daemon"} == set(FORBIDDEN)  # no layer unruled
    offenders = [
        f"{path.relative_to(SUPERVISOR)}:{problem}"
        for path, module in modules.items()
        for problem in broken_rules(path.read_text(), module.removesuffix(".__init__"))
    ]
    assert offenders == []


def test_only_the_docker_runtime_imports_docker():
    importers = {
        path.relative_to(SUPERVISOR).as_posix()
        for path in SUPERVISOR.rglob("*.py")
        for _, module in imported_modules(path.read_text(), "supervisor.x")
        if module == "docker" or module.startswith("docker.")
    }
    assert importers == {"runtime/docker_runtime.py"}


def test_modules_stay_small_and_the_owner_stays_an_owner():
    """No module over 500 lines, and the fleet's class under 450: a unit of its own beats a bigger room."""
    sizes = {
        path.relative_to(SUPERVISOR).as_posix(): len(path.read_text().splitlines()) for path in SUPERVISOR.rglob("*.py")
    }
    assert {path: n for path, n in sizes.items() if n > 500} == {}
    tree = ast.parse((SUPERVISOR / "fleet" / "owner.py").read_text())
    fleet = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Fleet")
    assert fleet.end_lineno - fleet.lineno + 1 < 450
