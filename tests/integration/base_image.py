"""A local Debian base image with python3, built once from Debian's packages and cached.

Tests that need a throwaway Debian host (install.sh's end-to-end test, a stand-in server) run
containers from it. No registry is involved: ``debootstrap`` builds a root filesystem from
the Debian mirror that this machine's apt uses (``LOCALLLM_DEBIAN_MIRROR`` overrides it), it is packed into a tarball under ``${LOCALLLM_CACHE:-~/.cache/localllm}/base-images/``
and ``docker import``-ed under a tag. The image carries a label with a key of the recipe, so a
changed package list rebuilds it; an existing image with the right key is reused as it is, and an
existing tarball is imported without running debootstrap again.

Usage::

    tag = ensure_base_image(docker.from_env())                      # localllm/debian-python:bookworm
    tag = ensure_base_image(client, tag="localllm/debian-ollama:bookworm", include=(*DEFAULT_INCLUDE, "curl"))
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import docker

BASE_TAG = "localllm/debian-python:bookworm"
SUITE = "bookworm"
# python3 has the whole standard library (http.server too; python3-minimal does not);
# python3-venv brings ensurepip's pip and setuptools wheels, so `python3 -m venv` gives a venv with pip.
DEFAULT_INCLUDE = ("python3", "python3-venv")
KEY_LABEL = "io.localllm.base-image-key"
RECIPE_VERSION = "1"  # bump when the way the root filesystem is made changes


def cache_dir() -> Path:
    """The project's cache, outside the clone (the same place scripts/dev.sh uses)."""
    if os.environ.get("LOCALLLM_CACHE"):
        return Path(os.environ["LOCALLLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "localllm"


APT_ETC = Path("/etc/apt")
MIRROR_SCHEMES = ("http://", "https://", "file:")  # what debootstrap fetches from


@dataclass(frozen=True)
class AptSource:
    """One URI of a binary (``deb``) source in apt's configuration, with the suites it serves there."""

    uri: str
    suites: tuple[str, ...]
    origin: str  # the file it was read from


def parse_deb822_sources(text: str, origin: str = "") -> list[AptSource]:
    """The ``deb`` sources of a deb822 ``*.sources`` file: stanzas of ``Types:``, ``URIs:``, ``Suites:``...

    Blank lines separate the stanzas, ``#`` starts a comment line, an indented line continues the
    field above it; field names are case-insensitive; a stanza with ``Enabled: no`` is skipped.
    """
    sources: list[AptSource] = []
    stanzas: list[dict[str, str]] = [{}]
    field_name = ""
    for line in text.splitlines():
        if not line.strip():
            stanzas.append({})
            field_name = ""
        elif line.startswith("#"):
            continue
        elif line[0] in " \t":
            if field_name:
                stanzas[-1][field_name] += " " + line.strip()
        elif ":" in line:
            field_name, _, value = line.partition(":")
            field_name = field_name.strip().lower()
            stanzas[-1][field_name] = value.strip()
    for stanza in stanzas:
        if stanza.get("enabled", "yes").strip().lower() == "no" or "deb" not in stanza.get("types", "").split():
            continue
        suites = tuple(stanza.get("suites", "").split())
        sources += [AptSource(uri, suites, origin) for uri in stanza.get("uris", "").split()]
    return sources


ONE_LINE_SOURCE = re.compile(r"^(?P<type>deb|deb-src)\s+(?:\[[^\]]*\]\s*)?(?P<uri>\S+)\s+(?P<suite>\S+)")


def parse_one_line_sources(text: str, origin: str = "") -> list[AptSource]:
    """The ``deb`` sources of a one-line ``sources.list``: ``deb [options] URI suite [component...]``."""
    sources = []
    for line in text.splitlines():
        found = ONE_LINE_SOURCE.match(line.split("#", 1)[0].strip())
        if found and found["type"] == "deb":
            sources.append(AptSource(found["uri"], (found["suite"],), origin))
    return sources


def apt_sources(etc: Path = APT_ETC) -> list[AptSource]:
    """apt's binary sources in apt's order: ``sources.list``, then ``sources.list.d/*.list`` and ``*.sources``."""
    files = [etc / "sources.list"]
    if (etc / "sources.list.d").is_dir():
        files += sorted(path for path in (etc / "sources.list.d").iterdir() if path.suffix in (".list", ".sources"))
    sources: list[AptSource] = []
    for path in files:
        if path.is_file():
            parse = parse_deb822_sources if path.suffix == ".sources" else parse_one_line_sources
            sources += parse(path.read_text(encoding="utf-8", errors="replace"), str(path))
    return sources


def apt_mirror(suite: str = SUITE, etc: Path | None = None) -> str:
    """The Debian mirror this machine's apt uses, for ``suite``.

    A source that serves ``suite`` itself comes first; else the first main archive (a suite with no
    ``-security``/``-updates``-like part, such as another release's), which carries the other releases too.
    """
    etc = etc or APT_ETC
    sources = [source for source in apt_sources(etc) if source.uri.startswith(MIRROR_SCHEMES)]
    for source in sources:
        if suite in source.suites:
            return source.uri
    for source in sources:
        if any("-" not in each and "/" not in each for each in source.suites):
            log(f"no apt source serves {suite}; using the main archive of {source.origin}: {source.uri}")
            return source.uri
    raise RuntimeError(
        f"no Debian mirror is configured for apt here ({etc}/sources.list, {etc}/sources.list.d/*.sources or "
        f"*.list have no http, https or file 'deb' source of {suite} or a main archive): add one, or set "
        "LOCALLLM_DEBIAN_MIRROR to a Debian mirror's URL"
    )


def mirror(suite: str = SUITE) -> str:
    """LOCALLLM_DEBIAN_MIRROR when set, else the mirror of this machine's apt sources."""
    return os.environ.get("LOCALLLM_DEBIAN_MIRROR") or apt_mirror(suite)


def recipe_key(suite: str, include: Sequence[str]) -> str:
    recipe = "\n".join([RECIPE_VERSION, suite, "minbase", *sorted(include)])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def log(message: str) -> None:
    print(f"base_image: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``: one builder at a time per cache (two pytest runs must not build into one place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _image_key(client: docker.DockerClient, tag: str) -> str | None:
    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None
    return (image.labels or {}).get(KEY_LABEL)


def _debootstrap() -> str:
    found = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin:/sbin")
    if not found:
        raise RuntimeError("debootstrap is missing: apt-get install debootstrap (scripts/dev.sh setup installs it)")
    return found


def build_rootfs_tarball(target: Path, suite: str = SUITE, include: Sequence[str] = DEFAULT_INCLUDE) -> Path:
    """debootstrap a minbase root filesystem with ``include`` and pack it into ``target`` (a .tar).

    Everything happens in a temp dir beside ``target``; the tarball appears under its name only
    once complete (rename), so an interrupted build leaves no half-made tarball behind, only a
    temp dir that the next build removes.
    """
    if os.geteuid() != 0:
        raise RuntimeError("building the base image runs debootstrap, which needs root")
    source = mirror(suite)  # before any work: no mirror configured is a clear error
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f"{target.stem}.tmp-*"):
        log(f"removing a half-finished build: {stale}")
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{target.stem}.tmp-", dir=target.parent))
    try:
        rootfs = work / "rootfs"
        started = time.monotonic()
        command = [_debootstrap(), "--variant=minbase", f"--include={','.join(include)}", suite, str(rootfs), source]
        log(f"running {' '.join(command)}")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"debootstrap failed (exit {done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
            )
        log(f"debootstrap took {time.monotonic() - started:.1f}s")
        # What a container never needs: downloaded packages and package lists.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / junk).glob("*"):
                if entry.is_file():
                    entry.unlink()
        packed = work / "rootfs.tar"
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(packed), "."], check=True)
        os.replace(packed, target)
        log(f"packed {target} ({target.stat().st_size / 2**20:.0f} MiB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def ensure_base_image(
    client: docker.DockerClient, tag: str = BASE_TAG, suite: str = SUITE, include: Sequence[str] = DEFAULT_INCLUDE
) -> str:
    """Return ``tag``, an image of Debian ``suite`` (minbase) with the ``include`` packages.

    Reused when the tag exists with this recipe's key; else imported from the cached tarball;
    else built with debootstrap (a few minutes, needs root and Debian's mirror) and cached.
    """
    key = recipe_key(suite, include)
    if _image_key(client, tag) == key:
        return tag
    cache = cache_dir() / "base-images"
    with locked(cache / ".lock"):
        if _image_key(client, tag) == key:  # another process built it meanwhile
            return tag
        tarball = cache / f"debian-{suite}-{key}.tar"
        if not tarball.is_file():
            started = time.monotonic()
            build_rootfs_tarball(tarball, suite, include)
            log(f"root filesystem for {tag} built in {time.monotonic() - started:.1f}s")
        started = time.monotonic()
        repository, _, image_tag = tag.rpartition(":") if ":" in tag.split("/")[-1] else (tag, "", "latest")
        client.api.import_image_from_file(
            str(tarball),
            repository=repository,
            tag=image_tag,
            changes=[f"LABEL {KEY_LABEL}={key}", 'CMD ["/bin/bash"]', "ENV LANG=C.UTF-8"],
        )
        if _image_key(client, tag) != key:
            raise RuntimeError(f"docker import of {tarball} did not give {tag} with {KEY_LABEL}={key}")
        log(f"imported {tag} in {time.monotonic() - started:.1f}s")
    return tag


if __name__ == "__main__":  # python tests/integration/base_image.py: build or reuse the default image
    print(ensure_base_image(docker.from_env()))
