"""What the fleet asks of the GPUs: readings and each container's own GPU memory, off the event loop.

One NVML session (``nvml.Nvml``) serves the daemon's life. A container's GPU
memory is the sum over NVML's compute processes whose cgroup names the
container (``cgroups``): not ``State.Pid``, which is docker-init under
``init: true`` and misses the runners Ollama starts as children.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from supervisor.core.placement import GpuReading
from supervisor.runtime.cgroups import container_of, usage_by_container
from supervisor.runtime.nvml import GpuProcess, Nvml

Usage = dict[int, int]  # pid -> bytes on the GPU(s) asked about


class GpuWatch:
    def __init__(self, nvml: Nvml, lookup: Callable[[int], str | None] = container_of):
        self.nvml = nvml
        self.lookup = lookup

    async def readings(self) -> list[GpuReading]:
        return await asyncio.to_thread(self.nvml.read)

    async def usage(self, container_ids: Iterable[str], gpu_index: int | None = None) -> dict[str, Usage]:
        """Per container (full ids): its processes' bytes, on ``gpu_index`` only when given."""
        wanted = [c for c in container_ids if c]
        if not wanted:
            return {}

        def read() -> dict[str, Usage]:
            processes: list[GpuProcess] = self.nvml.processes()
            if gpu_index is not None:
                processes = [p for p in processes if p.gpu_index == gpu_index]
            return usage_by_container(processes, wanted, self.lookup)

        return await asyncio.to_thread(read)

    async def held_by(self, pids: Iterable[int], gpu_index: int | None = None) -> Usage:
        """What these processes hold now (on ``gpu_index`` only when given); a process gone holds nothing.

        No cgroup lookup: the container may be gone already, and its pids are what was seen in it.
        """
        wanted = set(pids)

        def read() -> Usage:
            usage: Usage = {}
            for process in self.nvml.processes():
                if process.pid in wanted and (gpu_index is None or process.gpu_index == gpu_index):
                    usage[process.pid] = usage.get(process.pid, 0) + process.used_bytes
            return usage

        return await asyncio.to_thread(read)

    def close(self) -> None:
        self.nvml.close()


def memory_released(before: Usage, now: Usage, figure: int) -> bool:
    """Pure: has the memory a stopped model held come back?

    ``before`` is what its container's processes held just before the stop, ``now`` what those
    processes hold now (a process gone holds nothing). Released once every process of ``before`` is
    gone, or once what they freed covers ``figure`` (an Ollama model: what it measured; the server's
    other runners keep theirs).
    """
    still = sum(now.get(pid, 0) for pid in before)
    if not still:
        return True
    return sum(before.values()) - still >= min(figure, sum(before.values()))
