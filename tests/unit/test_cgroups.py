"""supervisor.runtime.cgroups: finding a GPU process's container through its cgroup, on recorded /proc/<pid>/cgroup files."""

from __future__ import annotations

import os

import pytest

from supervisor.runtime.cgroups import container_in_cgroup, container_of, usage_by_container
from supervisor.runtime.nvml import GpuProcess

GIB = 1024**3
SYSTEMD = "3f4a9c2e81b7d06f5e2a1c9b8d7e6f50a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9"
CGROUPFS = "9b1e7c4d2a8f60e3b5c9d1a7e4f2068b3c5d7e9f1a2b4c6d8e0f1a3b5c7d9e2f"
V1 = "c81d5e3a7b9f4062d8e1a3c5b7d9f0e2a4c6b8d0e1f3a5c7b9d2e4f6a8c0b1d3"
OUTER = "e2d4f6a8c0b1d3e5f7a9c2b4d6e8f0a1c3b5d7e9f2a4c6b8d0e1f3a5c7b9d2e4"
INNER = "17a3c5e7f9b2d4068e1a3c5f7b9d2e4a6c8e0f2b4d6a8c1e3f5b7d9a2c4e6f81"
KUBE = "5d7f9b1c3e5a7092c4e6b8d0f2a4c6e8b0d2f4a6c8e0b2d4f6a8c0e2b4d6f8a1"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cgroup-v2-systemd.txt", SYSTEMD),  # 0::/system.slice/docker-<id>.scope
        ("cgroup-v2-cgroupfs.txt", CGROUPFS),  # 0::/docker/<id>
        ("cgroup-v1.txt", V1),  # one line per hierarchy; the unified line names containerd
        ("cgroup-v2-host-process.txt", None),  # a desktop process: in no container
        ("cgroup-v2-docker-in-docker.txt", INNER),  # the innermost container is the process's own
        ("cgroup-v2-kubepods-containerd.txt", KUBE),
    ],
)
def test_recorded_cgroup_files(fixture_text, name, expected):
    assert container_in_cgroup(fixture_text(name)) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", None),
        ("0::/\n", None),  # inside a container with its own cgroup namespace
        ("0::/system.slice/docker.service\n", None),  # dockerd itself
        ("0::/init.scope\n", None),
        (
            f"11:memory:/system.slice/docker-{V1}.scope\n1:name=systemd:/system.slice/docker-{V1}.scope\n",
            V1,
        ),  # v1, systemd
        (f"0::/system.slice/libpod-{V1}.scope/container\n", V1),  # podman
        (f"5:cpuset:/kubepods/burstable/pod6f3c8a2e-5b1d-4e7a-9c0f-2d8b7e1a4c55/{KUBE}\n", KUBE),  # k8s, cgroupfs
        (f"0::/docker/{V1}0\n", None),  # 65 hex digits: not an id
        (f"0::/docker/{V1[:12]}\n", None),  # a short id is not what the file holds
        ("not a cgroup file\n", None),
    ],
)
def test_cgroup_texts(text, expected):
    assert container_in_cgroup(text) == expected


def test_container_of_reads_proc(tmp_path, fixture_text):
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "cgroup").write_text(fixture_text("cgroup-v2-systemd.txt"))
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "cgroup").write_text("0::/init.scope\n")
    assert container_of(4242, proc=tmp_path) == SYSTEMD
    assert container_of(1, proc=tmp_path) is None
    assert container_of(999, proc=tmp_path) is None  # gone between NVML's list and the read


def test_container_of_an_unreadable_file_is_none(tmp_path):
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "cgroup").mkdir()  # reading a directory raises an OSError, as a forbidden file would
    assert container_of(7, proc=tmp_path) is None


def test_container_of_this_process_does_not_raise():
    assert container_of(os.getpid()) is None or len(container_of(os.getpid())) == 64


OWNERS = {100: SYSTEMD, 101: SYSTEMD, 200: CGROUPFS, 300: None}


def test_usage_by_container_sums_a_process_over_two_gpus():
    processes = [
        GpuProcess(100, 3 * GIB, 0, "GPU-a"),
        GpuProcess(100, 2 * GIB, 1, "GPU-b"),  # one llama-server split over two GPUs
        GpuProcess(101, GIB, 1, "GPU-b"),  # an Ollama runner: a child, not State.Pid
        GpuProcess(200, 7 * GIB, 0, "GPU-a"),  # another container, not asked about
        GpuProcess(300, GIB, 0, "GPU-a"),  # a host process
    ]
    asked = []

    def lookup(pid):
        asked.append(pid)
        return OWNERS.get(pid)

    assert usage_by_container(processes, [SYSTEMD, KUBE], lookup) == {SYSTEMD: {100: 5 * GIB, 101: GIB}, KUBE: {}}
    assert sorted(asked) == [100, 101, 200, 300]  # once per pid


def test_usage_by_container_with_nothing_wanted_or_nothing_running():
    assert usage_by_container([GpuProcess(100, 1, 0, "")], [], OWNERS.get) == {}
    assert usage_by_container([], [SYSTEMD], OWNERS.get) == {SYSTEMD: {}}


def test_usage_by_container_with_container_of_on_a_recorded_proc(tmp_path, fixture_text):
    for pid, name in [(55, "cgroup-v1.txt"), (56, "cgroup-v2-docker-in-docker.txt")]:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text(fixture_text(name))
    processes = [GpuProcess(55, 10, 0, ""), GpuProcess(56, 20, 0, ""), GpuProcess(57, 30, 0, "")]  # 57 has exited
    usage = usage_by_container(processes, [V1, INNER, OUTER], lambda pid: container_of(pid, proc=tmp_path))
    assert usage == {V1: {55: 10}, INNER: {56: 20}, OUTER: {}}
