"""llama.cpp's ``llama-server``: how to run it in a container and reach it.

The server listens on a UNIX socket (``--host /run/llama/http.sock``: a host
ending in ``.sock`` is a socket to llama-server) in a directory bind-mounted
from ``<state_dir>/servers/<name>/``, and its container has no network at
all; ``upstream.py`` says who can reach the socket. ``/health`` answers 503
while the model loads and 200 once it can serve. The web UI and ``/slots``
are off: the UI is not routed by the proxy anyway, and ``/slots`` shows every
slot's prompt, which is other users' text.
"""

from __future__ import annotations

import re

from supervisor.config.profiles import Profile
from supervisor.config.settings import DaemonSettings, ModelEntry
from supervisor.core.containers import (
    SOCKET_NAME,
    BindMount,
    Confinement,
    ContainerSpec,
    Endpoint,
    container_name,
    memory_limit_for,
    servers_dir,
)
from supervisor.core.estimate import LaunchSettings
from supervisor.core.placement import Device

NAME = "llamacpp"
MODEL_DIR = "/models"
readiness_path = "/health"
SOCKET_DIR = "/run/llama"  # in the container: the socket's directory, mounted from <state_dir>/servers/<name>
SOCKET = f"{SOCKET_DIR}/{SOCKET_NAME}"
# The server's user by number (our CPU image is FROM scratch: no /etc/passwd, and no image needs a name):
# the daemon's own, or nobody for a root daemon (upstream.server_user). The model file must be readable
# by it: world-readable (0644, the usual mode) does.
# Threads count against the pids limit, and llama-server dies (std::terminate) when it cannot start
# one. It runs a compute thread per core, an HTTP pool of max(parallel + 4, cores - 1) threads, and
# up to 1024 more HTTP threads under a burst of connections (tools/server/server-http.cpp), plus the
# CUDA runtime's few: 2048 holds that on hosts up to about 480 cores, and still stops a fork bomb.
PIDS_LIMIT = 2048
# llama-server writes nothing outside its mounts (no temporary files in tools/server or common); a
# small /tmp is there for libraries that expect one. noexec: nothing is ever run from it.
TMPFS = (("/tmp", "rw,noexec,nosuid,nodev,size=64m,mode=1777"),)


def launch_settings(model: ModelEntry, profile: Profile) -> LaunchSettings:
    """Pure: how the server will run ``model``; the container spec and the estimator both use it."""
    defaults = profile.defaults
    gpu_layers = defaults.gpu_layers if model.gpu_layers is None else model.gpu_layers
    return LaunchSettings(
        context=model.context_size or defaults.context_size,
        parallel=model.parallel or defaults.parallel,
        cache_type_k=model.cache_type_k,
        cache_type_v=model.cache_type_v,
        gpu_layers=gpu_layers,
        on_gpu=profile.has_gpus and gpu_layers != 0,
        flash_attention=model.flash_attention,
        kv_unified=False,  # each slot its own share of the context, as the profiles' context_size / parallel mean
    )


def container_spec(
    model: ModelEntry,
    profile: Profile,
    settings: DaemonSettings,
    endpoint: Endpoint,
    device: Device | None = None,
    memory_need: int | None = None,
    user: tuple[int, int] = (65534, 65534),
) -> ContainerSpec:
    """Pure: the container that serves ``model`` on ``endpoint``'s socket under ``profile``, pinned to
    ``device``'s GPU, running as ``user`` (uid, gid).

    ``memory_need`` (bytes, the sizing's figure) limits the container's RAM on a CPU profile, with a
    margin (``memory_limit_for``). A GPU profile gets no RAM limit: its need is the GPU's memory, and
    the host memory the CUDA runtime maps is not what the estimate counts.
    """
    gguf, socket = model.gguf, endpoint.socket
    if gguf is None:  # ModelEntry's validator requires it of a llamacpp model
        raise ValueError(f"model '{model.name}' has no gguf file")
    if socket is None:
        raise ValueError(f"llama-server listens on a socket, not on {endpoint}")
    launch = launch_settings(model, profile)
    in_container = f"{MODEL_DIR}/{gguf.name}"
    command = [
        "--model",
        in_container,
        "--alias",
        model.name,
        "--host",
        SOCKET,
        "--no-webui",
        "--no-slots",
        *launch_flags(launch),
    ]
    if profile.has_gpus:
        command += gpu_flags(launch)
    command += model.extra_args
    return ContainerSpec(
        name=f"{container_name(settings.instance, model.name)}-{socket[:8]}",  # old and new may overlap
        image=model.image or profile.defaults.images.llamacpp,
        command=tuple(command),
        endpoint=endpoint,
        model=model.name,
        backend=NAME,
        owner=settings.instance,
        mounts=(
            BindMount(source=str(gguf.resolve()), target=in_container, read_only=True),
            BindMount(source=str(servers_dir(settings.state_dir) / socket), target=SOCKET_DIR, read_only=False),
        ),
        gpu_device_ids=_gpu_ids(profile, device),
        device=device.id if device else "cpu",  # a GPU profile without a device was refused above
        extra_labels=tuple(sorted(settings.labels.items())),
        confinement=confinement(profile, memory_need, user),
        network="none",
    )


def confinement(profile: Profile, memory_need: int | None, user: tuple[int, int]) -> Confinement:
    """Least privilege for llama-server: no capabilities, read-only root, not root, bounded pids and RAM."""
    limit = memory_limit_for(memory_need) if memory_need is not None and not profile.has_gpus else None
    return Confinement(user=f"{user[0]}:{user[1]}", pids_limit=PIDS_LIMIT, memory_limit=limit, tmpfs=TMPFS)


def launch_flags(launch: LaunchSettings) -> list[str]:
    """Every setting the estimate depends on, spelled out (common/arg.cpp), so that neither a default
    of a newer image nor ``--fit`` (on by default: it shrinks the context and the offload to what is
    free) can change what the server allocates behind the estimate's back."""
    return [
        "--ctx-size",
        str(launch.context),
        "--parallel",
        str(launch.parallel),  # explicit: -1 (the default) means 4 slots and a unified cache
        "--kv-unified" if launch.kv_unified else "--no-kv-unified",
        "--ubatch-size",
        str(launch.ubatch),
        "--cache-type-k",
        launch.cache_type_k,
        "--cache-type-v",
        launch.cache_type_v,
        "--flash-attn",
        "on" if launch.flash_attention else "off",  # never "auto": the estimate must know
        "--fit",
        "off",
    ]


def gpu_flags(launch: LaunchSettings) -> list[str]:
    """The offload, and the one GPU the container is given (its device request), which is CUDA0 inside it.

    Naming the device makes a server whose CUDA backend cannot start exit ("invalid device: CUDA0")
    instead of serving from the CPU with ``/health`` answering 200 (common/arg.cpp: parse_device_list).
    ``-ngl -1`` means "auto" to llama.cpp (fit to free memory); ours means every layer: ``all``.
    """
    layers = "all" if launch.gpu_layers < 0 else str(launch.gpu_layers)
    return ["--n-gpu-layers", layers, "--device", "CUDA0"]


def _gpu_ids(profile: Profile, device: Device | None) -> tuple[str, ...] | None:
    """The GPU of the container's device request: its UUID where known (stable across reboots and
    driver reorderings), else its index. None on a CPU profile; never () which Docker reads as every GPU."""
    if not profile.has_gpus:
        return None
    if device is None:
        raise ValueError(f"profile {profile.name} has GPUs, but no GPU was given for the container")
    if device.uuid:
        return (device.uuid,)
    if device.index is not None:
        return (str(device.index),)
    raise ValueError(f"device {device.id} has neither a UUID nor an index, so no GPU can be requested for it")


_BUFFER_LINE = re.compile(r"\b(\w+)(?:_Mapped)? (model|KV|compute) buffer size =\s+([\d.]+) MiB")


def reported_buffers(log: str) -> dict[str, float]:
    """llama-server's own buffer sizes in MiB, from its startup log (printed at verbosity 4: ``-lv 4``).

    Returns ``{"model": ..., "kv": ..., "compute": ...}`` summed over the devices the model runs on:
    the GPUs when it has any (``CUDA0``...), leaving out host buffers (``CPU``, ``CPU_Mapped``,
    ``CUDA_Host``) that do not count against a GPU's memory; otherwise the host's.
    """
    found = [(device, kind.lower(), float(mib)) for device, kind, mib in _BUFFER_LINE.findall(log)]
    on_gpu = any(not _is_host(device) for device, _, _ in found)
    sizes: dict[str, float] = {}
    for device, kind, mib in found:
        if _is_host(device) != on_gpu:
            sizes[kind] = sizes.get(kind, 0.0) + mib
    return sizes


def _is_host(device: str) -> bool:
    device = device.removesuffix("_Mapped")  # the model's mmap'd tensors: CPU_Mapped
    return device == "CPU" or device.endswith("_Host")
