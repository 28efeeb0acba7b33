"""llama.cpp's ``llama-server``: how to run it in a container and reach it.

The server binds 127.0.0.1 on the host network; ``/health`` answers 503
while the model loads and 200 once it can serve.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..config import DaemonSettings, ModelEntry
from ..containers import BindMount, ContainerSpec, container_name
from ..estimate import LaunchSettings
from ..placement import Device
from ..profiles import Profile

NAME = "llamacpp"
MODEL_DIR = "/models"
readiness_path = "/health"


def base_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def launch_settings(model: ModelEntry, profile: Profile) -> LaunchSettings:
    """Pure: how the server will run ``model``; the container spec and the estimator both use it."""
    defaults = profile.defaults
    gpu_layers = defaults.gpu_layers if model.gpu_layers is None else model.gpu_layers
    return LaunchSettings(
        context=model.context_size or defaults.context_size,
        parallel=defaults.parallel,
        cache_type_k=model.cache_type_k,
        cache_type_v=model.cache_type_v,
        gpu_layers=gpu_layers,
        on_gpu=profile.has_gpus and gpu_layers != 0,
    )


def container_spec(model: ModelEntry, profile: Profile, settings: DaemonSettings, port: int,
                   device: Device | None = None) -> ContainerSpec:
    """Pure: the container that serves ``model`` on ``port`` under ``profile``, pinned to ``device``'s GPU."""
    launch = launch_settings(model, profile)
    in_container = f"{MODEL_DIR}/{Path(model.gguf).name}"
    command = [
        "--model", in_container,
        "--alias", model.name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--ctx-size", str(launch.context),
        "--parallel", str(launch.parallel),
    ]
    if launch.cache_type_k != "f16" or launch.cache_type_v != "f16":
        command += ["--cache-type-k", launch.cache_type_k, "--cache-type-v", launch.cache_type_v]
    if profile.has_gpus:
        command += ["--n-gpu-layers", str(launch.gpu_layers)]
    command += model.extra_args
    return ContainerSpec(
        name=f"{container_name(settings.instance, model.name)}-{port}",  # unique: old and new may overlap
        image=model.image or profile.defaults.images.llamacpp,
        command=tuple(command),
        port=port,
        model=model.name,
        backend=NAME,
        owner=settings.instance,
        mounts=(BindMount(source=str(Path(model.gguf).resolve()), target=in_container, read_only=True),),
        gpu_device_ids=_gpu_ids(profile, device),
        device=device.id if device else ("gpu0" if profile.has_gpus else "cpu"),
        extra_labels=tuple(sorted(settings.labels.items())),
    )


def _gpu_ids(profile: Profile, device: Device | None) -> tuple[str, ...] | None:
    if not profile.has_gpus:
        return None
    return () if device is None or device.index is None else (str(device.index),)


_BUFFER_LINE = re.compile(r"\b(\w+)(?:_Mapped)? (model|KV|compute) buffer size =\s+([\d.]+) MiB")


def reported_buffers(log: str) -> dict[str, float]:
    """llama-server's own buffer sizes in MiB, from its startup log (printed at verbosity 4: ``-lv 4``).

    Returns ``{"model": ..., "kv": ..., "compute": ...}`` summed over devices.
    """
    sizes: dict[str, float] = {}
    for _device, kind, mib in _BUFFER_LINE.findall(log):
        key = kind.lower()
        sizes[key] = sizes.get(key, 0.0) + float(mib)
    return sizes
