"""scripts/requirements.lock: the versions that were tested are the versions that get installed.

The lock pins every dependency of pyproject.toml (runtime, the ``[test]`` extra, the build backend)
and everything they pull in, once each and within pyproject's ranges; this venv holds exactly those
versions (so these tests ran on them); the test command and install.sh install with it; and it names
no index, URL or host, only versions.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "scripts" / "requirements.lock"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
BUILD_REQUIRES = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
PIN = re.compile(r"^(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)==(?P<version>[A-Za-z0-9.+!_-]+)$")
# A host name in a comment: labels and one of the usual top-level domains ("dev.sh" or "3.11.7" are none).
HOST = re.compile(r"\b(?:[a-z0-9-]+\.)+(?:org|com|net|io|dev|edu|gov|info|cloud|[a-z]{2}\.[a-z]{2})\b", re.I)
REFRESH = "run `bash scripts/dev.sh lock` (after a dependency change), then `bash scripts/dev.sh setup`"


def lock_lines() -> list[str]:
    return [line.strip() for line in LOCK.read_text().splitlines() if line.strip()]


def pin_lines() -> list[tuple[str, str]]:
    """(canonical name, version) of each requirement line of the lock, in its order."""
    found = []
    for line in lock_lines():
        if not line.startswith("#"):
            match = PIN.match(line)
            assert match, f"not a plain `name==version` pin in {LOCK.name}: {line!r}"
            found.append((canonicalize_name(match["name"]), match["version"]))
    return found


def pins() -> dict[str, str]:
    """Canonical name -> pinned version."""
    return dict(pin_lines())


def requirements(group: Iterable[str]) -> list[Requirement]:
    return [Requirement(text) for text in group]


def applies(requirement: Requirement, extras: Iterable[str] = ()) -> bool:
    """Whether a requirement's marker holds here, for a dependency asked for with ``extras``."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in ("", *extras))


def installed_closure(top: Iterable[Requirement]) -> dict[str, Requirement]:
    """Every distribution that ``top`` needs here, transitively, as installed metadata declares it.

    Canonical name -> the first requirement that brought it in.
    """
    needed: dict[str, Requirement] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [requirement for requirement in top if applies(requirement)]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        needed.setdefault(name, requirement)
        try:
            declared = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue  # reported by the tests that compare versions
        todo += [each for each in map(Requirement, declared) if applies(each, requirement.extras)]
    return needed


RUNTIME = requirements(PROJECT["dependencies"])
TEST = requirements(PROJECT["optional-dependencies"]["test"])
BUILD = requirements(BUILD_REQUIRES)


def test_the_lock_is_only_exact_pins_once_each_and_names_no_url_or_host():
    lines = lock_lines()
    for line in lines:
        assert "://" not in line and "@" not in line, f"a URL or direct reference in the lock: {line!r}"
        assert not line.lstrip("#").strip().startswith("-"), f"a pip option in the lock: {line!r}"
        assert not HOST.search(line), f"a host name in the lock: {line!r}"
    names = [name for name, _ in pin_lines()]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert not duplicates, f"pinned more than once in {LOCK}: {duplicates}"
    assert len(names) >= len(RUNTIME)
    assert any("bash scripts/dev.sh lock" in line for line in lines if line.startswith("#")), "say how to refresh it"


@pytest.mark.parametrize(
    "requirement", [*RUNTIME, *TEST, *BUILD], ids=lambda requirement: f"{requirement.name}{requirement.specifier}"
)
def test_every_declared_dependency_is_pinned_within_its_range(requirement):
    locked = pins()
    name = canonicalize_name(requirement.name)
    assert name in locked, f"{requirement} (pyproject.toml) has no pin in {LOCK.name}: {REFRESH}"
    assert requirement.specifier.contains(Version(locked[name]), prereleases=True), (
        f"{name}=={locked[name]} in {LOCK.name} is outside pyproject.toml's {requirement}: {REFRESH}"
    )


def test_runtime_dependencies_have_one_pin_line_each():
    names = [name for name, _ in pin_lines()]
    for requirement in RUNTIME:
        assert names.count(canonicalize_name(requirement.name)) == 1, requirement


def test_this_venv_runs_the_locked_versions():
    """Every distribution the runtime and test dependencies pull in here is pinned, at the installed version."""
    locked = pins()
    unpinned, differ, missing = [], [], []
    for name, requirement in sorted(installed_closure([*RUNTIME, *TEST]).items()):
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{name} (for {requirement})")
            continue
        if name not in locked:
            unpinned.append(f"{name}=={version} (for {requirement})")
        elif Version(version) != Version(locked[name]):
            differ.append(f"{name}: installed {version}, locked {locked[name]}")
    assert not missing, f"not installed in this venv: {missing}: {REFRESH}"
    assert not unpinned, f"installed for a dependency but not pinned in {LOCK.name}: {unpinned}: {REFRESH}"
    assert not differ, f"this venv is not the locked one: {differ}: {REFRESH}"


def test_the_lock_pins_nothing_that_is_not_needed():
    needed = set(installed_closure([*RUNTIME, *TEST])) | {canonicalize_name(each.name) for each in BUILD}
    stale = sorted(set(pins()) - needed)
    assert not stale, f"pinned in {LOCK.name} but needed by no dependency any more: {stale}: {REFRESH}"


def test_the_test_command_and_install_sh_install_with_the_lock():
    dev = (REPO / "scripts" / "dev.sh").read_text()
    assert "LOCK=$ROOT/scripts/requirements.lock" in dev
    ensure_venv = dev[dev.index("ensure_venv() {") :].split("\n}\n", 1)[0]
    assert re.search(r'pip install [^\n]*-c "\$LOCK" -e "\$ROOT\[test\]"', ensure_venv), ensure_venv
    assert re.search(r"^  lock\) lock ;;$", dev, re.M), "bash scripts/dev.sh lock refreshes the lock"

    install = (REPO / "install.sh").read_text()
    pip_installs = [line for line in install.splitlines() if re.search(r"-m pip (install|wheel|download)", line)]
    assert pip_installs, "install.sh installs with pip"
    for line in pip_installs:
        assert '-c "$PREFIX/src/scripts/requirements.lock"' in line, f"install.sh installs without the lock: {line}"
    assert "pip wheel -c scripts/requirements.lock" in install, "--help says how to make a locked wheel directory"

    test_install = (REPO / "tests" / "integration" / "test_install.py").read_text()
    assert '"scripts" / "requirements.lock"' in test_install, "test_install's wheelhouse is built from the lock"
