"""What a model's container should be, as plain data, and how we mark it ours.

``ContainerSpec`` is pure data built by a backend; ``docker_runtime`` turns
it into a container. The config hash is compose's idea: sha256 of the
canonical JSON of everything that shapes the container, so a container whose
hash differs from the wanted spec has diverged.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field

LABEL_OWNER = "io.localllm.owner"
LABEL_MODEL = "io.localllm.model"
LABEL_CONFIG_HASH = "io.localllm.config-hash"
LABEL_PORT = "io.localllm.port"
LABEL_BACKEND = "io.localllm.backend"
LABEL_DEVICE = "io.localllm.device"


@dataclass(frozen=True)
class BindMount:
    source: str
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str
    command: tuple[str, ...]
    port: int
    model: str
    backend: str
    owner: str
    mounts: tuple[BindMount, ...] = ()
    environment: tuple[tuple[str, str], ...] = ()
    gpu_device_ids: tuple[str, ...] | None = None  # None: no GPU; (): all GPUs
    device: str = "cpu"  # the budget device it is placed on: cpu, gpu0, gpu1...
    extra_labels: tuple[tuple[str, str], ...] = field(default=())

    def config_hash(self) -> str:
        shaping = {
            "image": self.image,
            "command": list(self.command),
            "mounts": [asdict(m) for m in self.mounts],
            "environment": sorted(self.environment),
            "gpus": None if self.gpu_device_ids is None else list(self.gpu_device_ids),
        }
        canonical = json.dumps(shaping, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def labels(self) -> dict[str, str]:
        return {
            **dict(self.extra_labels),
            LABEL_OWNER: self.owner,
            LABEL_MODEL: self.model,
            LABEL_BACKEND: self.backend,
            LABEL_PORT: str(self.port),
            LABEL_DEVICE: self.device,
            LABEL_CONFIG_HASH: self.config_hash(),
        }


def container_name(owner: str, model: str) -> str:
    """A Docker-legal, unique, readable name: ``localllm-<owner>-<slug>-<hash6>``."""
    slug = re.sub(r"[^a-zA-Z0-9_.-]+", "-", model).strip("-.")[:40] or "model"
    digest = hashlib.sha256(model.encode()).hexdigest()[:6]
    return f"localllm-{owner}-{slug}-{digest}"
