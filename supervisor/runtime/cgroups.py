"""Which Docker container a host process belongs to, through ``/proc/<pid>/cgroup``.

A container's ``State.Pid`` is not enough to find its GPU processes: with
``init: true`` it is docker-init, and Ollama's model runners are its children.
Every process of a container, however deep, sits in the container's cgroup,
and the cgroup's path names the container id:

- cgroup v2, systemd driver:  ``0::/system.slice/docker-<id>.scope``
- cgroup v2, cgroupfs driver: ``0::/docker/<id>``
- cgroup v1: one line per hierarchy, ``4:memory:/docker/<id>`` (or the ``.scope`` form)
- Kubernetes / containerd:   ``.../kubepods-...slice/cri-containerd-<id>.scope``

``container_in_cgroup`` is the pure parser; ``container_of`` reads the file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from supervisor.runtime.nvml import GpuProcess

# A container id is 64 lowercase hex digits; bounded so a longer hex run (none known) is not cut into one.
_CONTAINER_ID = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")


def container_in_cgroup(text: str) -> str | None:
    """Pure: the container id a ``/proc/<pid>/cgroup`` text names, or None for a process in no container.

    With nesting (a container inside a container seen without a cgroup
    namespace), the innermost id is the one returned: it is the container the
    Docker daemon nearest to the process knows.
    """
    lines = [line.split(":", 2) for line in text.splitlines() if line.count(":") >= 2]
    # The unified hierarchy ("0::") is the one that counts on v2 and hybrid hosts; v1 lines all name the same id.
    lines.sort(key=lambda parts: parts[0] != "0" or parts[1] != "")
    for _hierarchy, _controllers, path in lines:
        found = _CONTAINER_ID.findall(path)
        if found:
            return found[-1]
    return None


def container_of(pid: int, proc: Path = Path("/proc")) -> str | None:
    """The container id of process ``pid``, or None when it is in none, has gone, or cannot be read."""
    try:
        text = (proc / str(pid) / "cgroup").read_text(encoding="utf-8", errors="replace")
    except OSError:  # gone (a process exits between NVML's list and this read), or not ours to read
        return None
    return container_in_cgroup(text)


def usage_by_container(
    processes: Iterable[GpuProcess], container_ids: Iterable[str], lookup: Callable[[int], str | None] = container_of
) -> dict[str, dict[int, int]]:
    """For each wanted container, ``{pid: GPU bytes summed over GPUs}`` of its processes ({} when none).

    Pure apart from ``lookup``, which is asked once per pid. Processes of other
    containers, or of none, are left out.
    """
    usage: dict[str, dict[int, int]] = {container: {} for container in container_ids}
    owners: dict[int, str | None] = {}
    for process in processes:
        if process.pid not in owners:
            owners[process.pid] = lookup(process.pid)
        owner = owners[process.pid]
        if owner in usage:
            pids = usage[owner]
            pids[process.pid] = pids.get(process.pid, 0) + process.used_bytes
    return usage
