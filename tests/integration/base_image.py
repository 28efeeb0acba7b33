"""A local Debian base image with python3, built once from Debian's packages and cached.

Tests that need a throwaway Debian host (install.sh's end-to-end test, a stand-in server) run
containers from it. No registry is involved: ``debootstrap`` builds a root filesystem from
Debian's mirror, it is packed into a tarball under ``${LOCALLLM_CACHE:-~/.cache/localllm}/base-images/``
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
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
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


def mirror() -> str:
    return os.environ.get("LOCALLLM_DEBIAN_MIRROR", "http://deb.debian.org/debian")


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
        command = [_debootstrap(), "--variant=minbase", f"--include={','.join(include)}", suite, str(rootfs), mirror()]
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
