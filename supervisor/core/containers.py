"""What a model's container should be, as plain data, and how we mark it ours.

``ContainerSpec`` is pure data built by a backend; ``docker_runtime`` turns
it into a container. The config hash is compose's idea: sha256 of the
canonical JSON of everything that shapes the container, so a container whose
hash differs from the wanted spec has diverged.

Every container runs confined (``Confinement``): no capabilities, no privilege
gain through setuid binaries, a read-only root filesystem with a tmpfs where the
server writes, a pids limit and, where the backend says so, a non-root user and
a memory limit. It is data in the spec, so it is in the hash: a container made
before a confinement change is recreated, not adopted.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

LABEL_OWNER = "io.localllm.owner"
LABEL_MODEL = "io.localllm.model"
LABEL_CONFIG_HASH = "io.localllm.config-hash"
LABEL_ENDPOINT = "io.localllm.endpoint"
LABEL_BACKEND = "io.localllm.backend"
LABEL_DEVICE = "io.localllm.device"


@dataclass(frozen=True)
class BindMount:
    source: str
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class Endpoint:
    """Where a model server listens, reachable by localllm alone.

    ``socket``: a UNIX socket in a directory of its own (``<state_dir>/servers/<socket>/``, mode 0700 under
    a 0700 parent): no port to squat, nothing another local user can connect to. Every server we run has
    one (Ollama's through its relay). ``port``: a TCP port on 127.0.0.1, for a server elsewhere.
    """

    socket: str | None = None  # the socket directory's name (hex), which is also the URL's host
    port: int | None = None

    def __post_init__(self) -> None:
        if (self.socket is None) == (self.port is None):
            raise ValueError("an endpoint is a socket or a port, not both or neither")
        if self.socket is not None and not re.fullmatch(r"[0-9a-f]{8,32}", self.socket):
            raise ValueError(f"socket name '{self.socket}' is not 8-32 hex digits")

    @property
    def url(self) -> str:
        """The base URL; a socket's host is resolved by ``upstream.ServerConnector``, never by DNS."""
        return f"http://{self.socket}{SOCKET_HOST_SUFFIX}" if self.socket else f"http://127.0.0.1:{self.port}"

    def label(self) -> str:
        return f"unix:{self.socket}" if self.socket else f"tcp:{self.port}"

    @classmethod
    def from_label(cls, text: str) -> Endpoint:
        """The endpoint a container's label names; ValueError when it names none."""
        kind, _, value = text.partition(":")
        if kind == "unix":
            return cls(socket=value)
        if kind == "tcp" and value.isdigit():
            return cls(port=int(value))
        raise ValueError(f"'{text}' is not unix:<name> or tcp:<port>")

    def __str__(self) -> str:
        return f"socket {self.socket}" if self.socket else f"port {self.port}"


SOCKET_NAME = "http.sock"  # in every server's socket directory
SOCKET_HOST_SUFFIX = ".sock.localllm"  # a host that no DNS would answer: a socket's URL cannot leak to TCP


@dataclass(frozen=True)
class Confinement:
    """What a container may do besides serving: least privilege, as the backend asks for it.

    The defaults hold for every container: a model server listens on a socket in its mounted
    directory and reads its mounts, which needs no capability; nothing in it should gain privileges (setuid
    binaries); it writes nothing outside its mounts and ``tmpfs``.
    """

    user: str | None = None  # "uid:gid"; None: the image's own user (root for the images we use)
    pids_limit: int | None = None  # processes and threads together (the kernel counts both)
    memory_limit: int | None = None  # bytes of RAM, swap included (none allowed beyond it)
    tmpfs: tuple[tuple[str, str], ...] = ()  # (path, mount options): the only writable places besides mounts
    read_only_root: bool = True
    cap_drop: tuple[str, ...] = ("ALL",)
    security_opt: tuple[str, ...] = ("no-new-privileges",)


MEMORY_MARGIN = 0.25
MEMORY_SLACK = 256 << 20


def memory_limit_for(need: int) -> int:
    """The RAM limit of a container whose model needs ``need`` bytes: a quarter more, plus 256 MiB.

    The margin covers what the estimate leaves out (the server's own heap, HTTP buffers, a longer
    prompt's scratch); past it the kernel kills the container (OOM, reported as such) instead of the
    host swapping or another model's server being killed.
    """
    return int(need * (1 + MEMORY_MARGIN)) + MEMORY_SLACK


def readable_by(user: str, mode: int, owner_uid: int, owner_gid: int) -> bool:
    """Whether a file of ``mode`` owned by ``owner_uid:owner_gid`` can be read by ``user`` ("uid:gid").

    Only the permission bits: the container's user has no capability to override them (ACLs are not
    looked at, so a file readable only through an ACL counts as unreadable).
    """
    uid_text, _, gid_text = user.partition(":")
    uid, gid = int(uid_text), int(gid_text or uid_text)
    if uid == owner_uid:
        return bool(mode & 0o400)
    if gid == owner_gid:
        return bool(mode & 0o040)
    return bool(mode & 0o004)


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str
    command: tuple[str, ...]
    endpoint: Endpoint
    model: str
    backend: str
    owner: str
    mounts: tuple[BindMount, ...] = ()
    environment: tuple[tuple[str, str], ...] = ()
    gpu_device_ids: tuple[str, ...] | None = None  # None: no GPU; (): all GPUs
    device: str = "cpu"  # the budget device it is placed on: cpu, gpu0, gpu1...
    extra_labels: tuple[tuple[str, str], ...] = field(default=())
    confinement: Confinement = Confinement()
    network: str = "none"  # Docker's network mode: "none", "host", or the name of a network of ours
    entrypoint: tuple[str, ...] | None = None  # None: the image's own

    def config_hash(self) -> str:
        """sha256 of what shapes the server, as compose's: not where it listens. Its socket directory has a fresh name
        for every container, so a config change's new version hashes as its generation recorded it."""
        mounts = [asdict(m) for m in self.mounts]
        for mount in mounts:
            if self.endpoint.socket and Path(mount["source"]).name == self.endpoint.socket:
                mount["source"] = "<its socket directory>"
        shaping = {
            "image": self.image,
            "command": list(self.command),
            "mounts": mounts,
            "environment": sorted(self.environment),
            "gpus": None if self.gpu_device_ids is None else list(self.gpu_device_ids),
            "confinement": asdict(self.confinement),
            "network": self.network,
            "entrypoint": None if self.entrypoint is None else list(self.entrypoint),
        }
        canonical = json.dumps(shaping, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def labels(self) -> dict[str, str]:
        return {
            **dict(self.extra_labels),
            LABEL_OWNER: self.owner,
            LABEL_MODEL: self.model,
            LABEL_BACKEND: self.backend,
            LABEL_ENDPOINT: self.endpoint.label(),
            LABEL_DEVICE: self.device,
            LABEL_CONFIG_HASH: self.config_hash(),
        }


def container_name(owner: str, model: str) -> str:
    """A Docker-legal, unique, readable name: ``localllm-<owner>-<slug>-<hash6>``."""
    slug = re.sub(r"[^a-zA-Z0-9_.-]+", "-", model).strip("-.")[:40] or "model"
    digest = hashlib.sha256(model.encode()).hexdigest()[:6]
    return f"localllm-{owner}-{slug}-{digest}"


def servers_dir(state_dir: Path) -> Path:
    """Where every model server's socket directory lives."""
    return state_dir / "servers"
