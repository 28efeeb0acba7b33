"""Ollama: one server container holds every ``backend: ollama`` model; models load and unload through its API.

The server runs on a bridge network of localllm's (pulls need the network),
listening on 127.0.0.1 in its own network namespace, and localllm reaches it
through a relay on a UNIX socket (``ollama_relay``): Ollama has no API key and
listens on TCP only, so nothing else on the host may reach it. It keeps its
store in a host directory (``ollama.models_dir``) and sees exactly one GPU of a
GPU profile (``ollama.device``, default gpu0): every Ollama model is charged to
that device, so Ollama's own placement and eviction cannot spread them where
our budget does not look. ``/api/version`` answers once it can serve. A model's "spec" is the
server's spec plus what the model is loaded with, so a change to either makes
the model's config hash differ (and a config change reloads it).

The server runs confined like every container (``Confinement``), as the user
that owns its store when the caller names it (``store_owner``): without
capabilities, even root cannot write a store it does not own. The store is
mounted at ``HOME/.ollama`` under a ``HOME`` of our own, not ``/root/.ollama``:
``/root`` is 0700 in the image, so no other user could reach a store under it,
and Ollama keeps its key in ``$HOME/.ollama``. The layout of the store on the host
is the same either way (``models/``, ``id_ed25519``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from supervisor.config.profiles import Profile
from supervisor.config.settings import Config, ModelEntry, OllamaSettings
from supervisor.core.backends import ollama_relay
from supervisor.core.containers import (
    SOCKET_NAME,
    BindMount,
    Confinement,
    ContainerSpec,
    Endpoint,
    container_name,
    servers_dir,
)
from supervisor.core.estimate import LaunchSettings
from supervisor.core.placement import Device

NAME = "ollama"
SERVER_LABEL = "_ollama"  # the model label of the server container; catalog names cannot start with "_"
HOME = "/home/ollama"  # the server's $HOME: the parent of its store, created by Docker for the mount
STORE = f"{HOME}/.ollama"  # where Ollama keeps its models (and its key, in $HOME/.ollama)
readiness_path = "/api/version"
# The server (Go: a thread per core plus those blocked in syscalls) starts a runner process per loaded
# model, each with a compute thread per core and Go threads of its own; all count against the limit,
# and a Go program that cannot start a thread dies. 4096 holds a dozen models on a 128-core host.
PIDS_LIMIT = 4096
# Runners may write temporary files; releases that still unpacked runners into /tmp ran them from
# there, which noexec forbids: the images we run keep their runners in /usr/lib/ollama.
TMPFS = (("/tmp", "rw,noexec,nosuid,nodev,size=1g,mode=1777"),)


def context_of(config: Config, profile: Profile) -> int:
    """The one context every Ollama model runs with: ``ollama.context_size``, else the profile's.

    One for all, because Ollama reloads a model whenever a request's ``num_ctx`` differs from what it
    was loaded with, and its OpenAI endpoints never send one: they use ``OLLAMA_CONTEXT_LENGTH``.
    """
    return config.ollama.context_size or profile.defaults.context_size


def device_id(settings: OllamaSettings, profile: Profile) -> str:
    """The budget device every Ollama model is charged to: ``ollama.device`` on a GPU profile (default gpu0)."""
    return (settings.device or "gpu0") if profile.has_gpus else "cpu"


def launch_settings(settings: OllamaSettings, profile: Profile) -> LaunchSettings:
    """Pure: how an Ollama model is loaded (``options.num_ctx``, ``OLLAMA_NUM_PARALLEL``), for the sizing."""
    return LaunchSettings(
        context=settings.context_size or profile.defaults.context_size,
        parallel=settings.num_parallel,
        cache_type_k="f16",
        cache_type_v="f16",
        gpu_layers=-1 if profile.has_gpus else 0,
        on_gpu=profile.has_gpus,
        flash_attention=settings.flash_attention,
    )


def server_spec(
    config: Config,
    profile: Profile,
    endpoint: Endpoint,
    device: Device | None = None,
    store_owner: tuple[int, int] | None = None,
) -> ContainerSpec:
    """Pure: the Ollama server container for ``config``'s ``ollama:`` section, reached on ``endpoint``'s socket
    through its relay, seeing ``device`` only.

    A GPU profile needs the device: a server that saw every GPU would place and evict by its own rules.
    ``store_owner`` (uid, gid of the store directory) is the user the server runs as; None keeps the
    image's root, which without capabilities can write only a store that root owns. The server gets
    no memory limit: what it holds changes with every load, and the scheduler charges it per model.
    """
    socket = endpoint.socket
    if socket is None:
        raise ValueError(f"the Ollama server's relay listens on a socket, not on {endpoint}")
    wanted = device_id(config.ollama, profile)
    if profile.has_gpus and (device is None or device.id != wanted or device.gpu_request is None):
        raise ValueError(f"the Ollama server needs its GPU {wanted} (ollama.device), which this host does not have")
    settings, daemon = config.ollama, config.daemon
    environment = {
        "OLLAMA_HOST": f"127.0.0.1:{ollama_relay.SERVER_PORT}",  # in its own network namespace
        "OLLAMA_MODELS": f"{STORE}/models",
        "OLLAMA_KEEP_ALIVE": settings.keep_alive,
        "OLLAMA_NUM_PARALLEL": str(settings.num_parallel),
        "OLLAMA_FLASH_ATTENTION": "1" if settings.flash_attention else "0",
        "OLLAMA_CONTEXT_LENGTH": str(context_of(config, profile)),
        "OLLAMA_MAX_LOADED_MODELS": str(settings.max_loaded_models),
        **settings.env,
        "HOME": HOME,  # last: the key's place follows the store's mount, whatever ollama.env says
    }
    return ContainerSpec(
        name=f"{container_name(daemon.instance, 'ollama')}-{socket[:8]}",
        image=settings.image or profile.defaults.images.ollama,
        command=("serve",),
        entrypoint=ollama_relay.entrypoint(SOCKET_NAME),
        endpoint=endpoint,
        model=SERVER_LABEL,
        backend=NAME,
        owner=daemon.instance,
        mounts=(
            BindMount(source=str(Path(config.ollama_store).resolve()), target=STORE, read_only=False),
            BindMount(
                source=str(servers_dir(daemon.state_dir) / socket), target=ollama_relay.SOCKET_DIR, read_only=False
            ),
        ),
        environment=tuple(sorted(environment.items())),
        gpu_device_ids=(device.gpu_request,) if device is not None and device.gpu_request else None,
        device=wanted,
        extra_labels=tuple(sorted(daemon.labels.items())),
        confinement=Confinement(
            user=None if store_owner is None else f"{store_owner[0]}:{store_owner[1]}",
            pids_limit=PIDS_LIMIT,
            tmpfs=TMPFS,
        ),
        network=network_name(daemon.instance),  # its own namespace; pulls need the network
    )


def network_name(instance: str) -> str:
    """The bridge network of the daemon's Ollama server: its own network namespace, with a way out for pulls."""
    return f"localllm-{instance}"


@dataclass(frozen=True)
class ModelSpec:
    """An Ollama model as served: its server, its tag and the context it is loaded with."""

    server: ContainerSpec
    tag: str
    context: int
    device: str

    @property
    def endpoint(self) -> Endpoint:
        return self.server.endpoint

    def config_hash(self) -> str:
        identity = f"{self.server.config_hash()}|{self.tag}|{self.context}"
        return hashlib.sha256(identity.encode()).hexdigest()


def model_spec(model: ModelEntry, server: ContainerSpec, device: str | None) -> ModelSpec:
    assert model.tag is not None, "an ollama model without a tag"
    context = int(dict(server.environment)["OLLAMA_CONTEXT_LENGTH"])
    return ModelSpec(server, model.tag, context, device or server.device)
