"""install.sh end to end, in a throwaway Debian container.

The container comes from a local Debian bookworm image with python3 (``base_image.py``), runs with
no network, the checkout mounted read-only at /src and a wheelhouse of the dependencies at /wheels,
made with ``pip wheel -c scripts/requirements.lock`` (the locked versions). In it,
``bash /src/install.sh --wheels /wheels`` runs twice (the second run must change nothing that an
operator made), then ``--uninstall`` and ``--uninstall --purge``; every step is checked from inside,
and so is the installed venv: it holds exactly the locked versions.

The base image and the wheelhouse are cached under ``${LOCALLLM_CACHE:-~/.cache/localllm}``, so a
re-run takes only the work in the container (10 to 20 s on 2 cores).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import docker
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .base_image import cache_dir, ensure_base_image, locked
from .conftest import RUN_ID, TEST_RUN_LABEL

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "scripts" / "requirements.lock"
KIND_LABEL = "io.localllm.test"  # value "install": what a later run removes if this one was killed
INSTALL = "bash /src/install.sh"
CONFIG = "/etc/localllm/config.yaml"
VENV = "/opt/localllm/venv"
TIMINGS: dict[str, float] = {}


@contextlib.contextmanager
def timed(what: str):
    started = time.monotonic()
    yield
    TIMINGS[what] = time.monotonic() - started


def wheel_requirements() -> list[str]:
    """What pip needs to install the checkout offline: the build backend and the dependencies."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [*project["build-system"]["requires"], *project["project"]["dependencies"]]


def python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}-{platform.machine()}"


def ensure_wheelhouse() -> Path:
    """Wheels of the locked dependencies, for this interpreter's Python version, cached by requirements and lock.

    The package itself is not among them: install.sh builds it from the mounted checkout, as on a
    real host. A changed requirement list or lock gives a new directory; older ones are removed.
    """
    requirements = wheel_requirements()
    key = hashlib.sha256("\n".join([python_tag(), *requirements, LOCK.read_text()]).encode()).hexdigest()[:12]
    root = cache_dir() / "wheels"
    target = root / key
    if (target / ".complete").is_file():
        return target
    with locked(root / ".lock"):
        if (target / ".complete").is_file():
            return target
        for old in root.iterdir():
            if old.is_dir() and old != target:
                shutil.rmtree(old, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=root))
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--disable-pip-version-check",
                "--wheel-dir",
                str(work),
                "--constraint",
                str(LOCK),
                *requirements,
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            shutil.rmtree(work, ignore_errors=True)
            raise RuntimeError(f"pip wheel failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
        (work / ".complete").write_text("\n".join(requirements) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.rename(work, target)
    return target


@dataclass
class Box:
    """A running throwaway container; ``sh`` runs a bash script in it and keeps a transcript."""

    container: docker.models.containers.Container
    transcript: list[str] = field(default_factory=list)

    def sh(self, script: str, expect: int | None = 0) -> str:
        started = time.monotonic()
        code, output = self.container.exec_run(["bash", "-c", script])
        text = output.decode(errors="replace")
        self.transcript.append(f"$ {script}\n{text}[exit {code}, {time.monotonic() - started:.1f}s]")
        if expect is not None:
            assert code == expect, f"`{script}` exited {code}, expected {expect}\n{self.log()}"
        return text

    def ok(self, condition: str) -> bool:
        """Whether a shell test, such as ``[ -e /path ]``, holds in the container."""
        return self.container.exec_run(["bash", "-c", condition])[0] == 0

    def log(self) -> str:
        return "---- transcript of the container ----\n" + "\n".join(self.transcript)


@pytest.fixture(scope="module")
def client(engine):
    """The session's Docker client (conftest): it fails clearly when there is no engine."""
    return engine


@pytest.fixture(scope="module")
def box(client):
    with timed("base image (build or reuse)"):
        image = ensure_base_image(client)
    with timed("wheelhouse (build or reuse)"):
        wheels = ensure_wheelhouse()
    for stale in client.containers.list(all=True, filters={"label": f"{KIND_LABEL}=install"}, ignore_removed=True):
        with contextlib.suppress(docker.errors.NotFound):
            stale.remove(force=True)
    container = client.containers.run(
        image,
        ["sleep", "infinity"],
        detach=True,
        auto_remove=True,
        network_mode="none",
        name=f"localllm-install-test-{RUN_ID}",
        labels={TEST_RUN_LABEL: RUN_ID, KIND_LABEL: "install"},
        volumes={str(REPO): {"bind": "/src", "mode": "ro"}, str(wheels): {"bind": "/wheels", "mode": "ro"}},
    )
    box = Box(container)
    try:
        version = box.sh("python3 -c 'import sys; print(\"cp%d%d\" % sys.version_info[:2])'").strip()
        assert python_tag().startswith(version + "-"), (
            f"the wheelhouse is for {python_tag()}, the container's Python is {version}: run the tests with "
            "a venv of the same Python version as Debian bookworm's"
        )
        yield box
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
        print("\ntest_install timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in TIMINGS.items()))


def stat(box: Box, path: str) -> str:
    return box.sh(f"stat -c '%a %U %G' {path}").strip()


# One exec for all the facts of an installed host: "name: value" lines.
FACTS = f"""
# fact NAME COMMAND prints "NAME: [EXIT] OUTPUT", the output's whitespace collapsed to single spaces.
fact() {{ out=$(eval "$2" 2>&1); rc=$?; printf '%s: [%s] %s\\n' "$1" "$rc" "$(echo $out)"; }}
fact groups 'getent group localllm docker | cut -d: -f1'
fact role_groups 'getent group localllm-operators localllm-viewers | cut -d: -f1'
fact home_shell 'getent passwd localllm | cut -d: -f6,7'
fact member_of 'id -nG localllm'
fact localllmd '{VENV}/bin/localllmd --version'
fact localllmctl_on_path 'localllmctl --version'
fact links 'readlink /usr/local/bin/localllmctl /usr/local/bin/localllmd'
fact import 'cd / && {VENV}/bin/python -c "import supervisor; print(supervisor.__file__)"'
fact system_python_import 'cd / && python3 -c "import supervisor" 2>/dev/null'
fact config_mode 'stat -c "%a %U %G" {CONFIG}'
fact profile 'grep "^profile:" {CONFIG} | cut -d" " -f1,2'
fact validate '{VENV}/bin/localllmctl config validate {CONFIG}'
fact daemon_reads_config 'runuser -u localllm -- cat {CONFIG} >/dev/null'
fact state_mode 'stat -c "%a %U %G" /var/lib/localllm'
fact unit_same 'cmp /src/systemd/localllm.service /etc/systemd/system/localllm.service'
fact unit_mode 'stat -c "%a %U %G" /etc/systemd/system/localllm.service'
"""

INSTALLED = {
    "groups": "[0] localllm docker",
    "role_groups": "[0] localllm-operators localllm-viewers",  # the role sockets' groups in the config written
    "home_shell": "[0] /var/lib/localllm:/usr/sbin/nologin",
    "member_of": "[0] localllm docker localllm-operators localllm-viewers",  # it gives the role sockets their groups
    "localllmd": "[0] localllmd 0.1.0",
    "localllmctl_on_path": "[0] localllmctl 0.1.0",  # through the link in /usr/local/bin
    "links": f"[0] {VENV}/bin/localllmctl {VENV}/bin/localllmd",
    "import": f"[0] {VENV}/lib/python3.11/site-packages/supervisor/__init__.py",
    "system_python_import": "[1] ",  # the venv is isolated: the system's Python does not see the package
    "config_mode": "[0] 640 root localllm",
    "profile": "[0] profile: cpu-only",  # no GPU on this host
    "validate": f"[0] {CONFIG}: valid (0 models, profile cpu-only)",
    "daemon_reads_config": "[0] ",
    "state_mode": "[0] 751 localllm localllm",  # the role groups reach their sockets in it
    "unit_same": "[0] ",
    "unit_mode": "[0] 644 root root",
}


def assert_installed(box: Box) -> None:
    output = box.sh(FACTS)
    facts = dict(line.split(": ", 1) for line in output.splitlines() if ": " in line)
    assert facts == INSTALLED, f"facts of the installed host differ\n{box.log()}"
    assert_locked(box)


def locked_versions() -> dict[str, str]:
    pins = (line.split("==") for line in LOCK.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {canonicalize_name(name): version for name, version in pins}


def assert_locked(box: Box) -> None:
    """The installed venv holds the locked versions and nothing else (but the venv's own pip and setuptools)."""
    listing = box.sh(f"{VENV}/bin/python -m pip list --format=freeze --disable-pip-version-check")
    installed = {canonicalize_name(name): version for name, version in (line.split("==") for line in listing.split())}
    assert installed.pop("localllm") == "0.1.0", listing
    for tool in ("pip", "setuptools"):  # python3 -m venv brings them; the build backend runs in pip's build env
        installed.pop(tool, None)
    locked = locked_versions()
    unlocked = {
        name: f"{version} (lock: {locked.get(name)})"
        for name, version in installed.items()
        if locked.get(name) != version
    }
    assert not unlocked, f"the installed venv holds other versions than {LOCK.name}: {unlocked}\n{box.log()}"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    missing = {canonicalize_name(Requirement(each).name) for each in project["dependencies"]} - set(installed)
    assert not missing, f"dependencies missing from the installed venv: {missing}\n{box.log()}"


def test_install_twice_then_uninstall_then_purge(box):
    with timed("first install"):
        first = box.sh(f"{INSTALL} --wheels /wheels")
    for step in (
        "creating the system group localllm",
        "creating the system user localllm",
        "creating the venv /opt/localllm/venv",
        f"writing {CONFIG}",
        "systemd is not running here; start the daemon by hand",
    ):
        assert step in first, f"no '{step}' in the first run's output\n{box.log()}"
    assert_installed(box)
    uid = box.sh("id -u localllm")

    # An operator edits the config and the state directory fills; a second run keeps both.
    box.sh(f"sed -i 's/^  default_ttl: 30m/  default_ttl: 5m/' {CONFIG} && echo '# edited by hand' >> {CONFIG}")
    box.sh("echo '{}' > /var/lib/localllm/learned-sizes.json && chown localllm: /var/lib/localllm/learned-sizes.json")
    edited = box.sh(f"sha256sum {CONFIG}")
    with timed("second install"):
        second = box.sh(f"{INSTALL} --wheels /wheels")
    assert f"keeping the existing {CONFIG}" in second
    assert "creating" not in second, f"the second run created something again\n{box.log()}"
    assert box.sh(f"sha256sum {CONFIG}") == edited, f"the second run changed the config\n{box.log()}"
    assert "default_ttl: 5m" in box.sh(f"cat {CONFIG}")
    assert box.sh("id -u localllm") == uid
    assert_installed(box)
    box.sh("[ -f /var/lib/localllm/learned-sizes.json ]")

    with timed("uninstall"):
        out = box.sh(f"{INSTALL} --uninstall")
    assert "kept: /etc/localllm/config.yaml, /var/lib/localllm, the user and group localllm, the models" in out
    for gone in (
        "/opt/localllm",
        "/etc/systemd/system/localllm.service",
        "/usr/local/bin/localllmctl",
        "/usr/local/bin/localllmd",
    ):
        assert not box.ok(f"[ -e {gone} ] || [ -L {gone} ]"), f"{gone} is still there\n{box.log()}"
    assert box.sh(f"sha256sum {CONFIG}") == edited
    box.sh("[ -f /var/lib/localllm/learned-sizes.json ]")
    assert stat(box, "/var/lib/localllm") == "751 localllm localllm"
    assert box.sh("id -u localllm") == uid

    with timed("uninstall --purge"):
        out = box.sh(f"{INSTALL} --uninstall --purge")
    assert "purging /etc/localllm and /var/lib/localllm" in out and "removing the user localllm" in out
    for gone in ("/etc/localllm", "/var/lib/localllm", "/opt/localllm"):
        assert not box.ok(f"[ -e {gone} ]"), f"{gone} is still there\n{box.log()}"
    box.sh("getent passwd localllm", expect=2)
    box.sh("getent group localllm", expect=2)
    box.sh("getent group localllm-viewers", expect=2)
    box.sh("getent group localllm-operators", expect=2)
    box.sh("getent group docker")  # not ours to remove: Docker's packages use it
    # Nothing left to remove: a no-op that still succeeds.
    assert "nothing at /opt/localllm" in box.sh(f"{INSTALL} --uninstall --purge")


def test_arguments(box):
    assert "--wheels DIR" in box.sh(f"{INSTALL} --help")
    assert "--purge goes with --uninstall" in box.sh(f"{INSTALL} --purge", expect=2)
    assert "unknown argument: --nope" in box.sh(f"{INSTALL} --nope", expect=2)
    assert "--wheels needs a directory" in box.sh(f"{INSTALL} --wheels", expect=2)
    assert "no such directory" in box.sh(f"{INSTALL} --wheels /nowhere", expect=1)
    assert "run as root" in box.sh(f"setpriv --reuid=65534 --regid=65534 --clear-groups {INSTALL}", expect=1)
