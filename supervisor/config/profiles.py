"""Hardware profiles: a class of host and the defaults that suit it.

Built-in profiles are the YAML files in the repository's ``profiles/``
directory (installed as the ``supervisor.config.profiles`` package data); a config
may add a directory of its own. ``closest_profile`` is the pure choice behind
``profile: auto``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from supervisor.config.schema import Strict, read_model
from supervisor.core.errors import ConfigError

GIB = 1024**3


class GpuSpec(Strict):
    vram_gib: float = Field(gt=0)
    name: str = ""


class Hardware(Strict):
    gpus: list[GpuSpec] = []
    ram_gib: float = Field(gt=0)
    cpu_cores: int = Field(gt=0)


class Images(Strict):
    llamacpp: str
    ollama: str = "ollama/ollama"


class ProfileDefaults(Strict):
    images: Images
    context_size: int = Field(default=4096, ge=128)
    gpu_layers: int = Field(default=0, ge=-1)
    vram_reserve_gib: float = Field(default=0.0, ge=0)
    ram_reserve_gib: float = Field(default=0.0, ge=0)  # host memory kept free when models run on the CPU
    parallel: int = Field(default=1, ge=1)


class Profile(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    description: str = ""
    hardware: Hardware
    defaults: ProfileDefaults

    @property
    def has_gpus(self) -> bool:
        return bool(self.hardware.gpus)


@dataclass(frozen=True)
class HostFacts:
    """What detection found on this machine."""

    gpu_vram_gib: tuple[float, ...]
    ram_gib: float
    cpu_cores: int
    gpu_source: str = "none"  # "nvml", "nvidia-smi" or "none"
    unusable_gpus: tuple[str, ...] = ()  # "GPU <index> (<uuid>): <problem>" for each GPU found but not counted

    def describe(self) -> str:
        if self.gpu_vram_gib:
            gpus = f"{len(self.gpu_vram_gib)} GPU(s) with " + ", ".join(f"{v:.1f}" for v in self.gpu_vram_gib) + " GiB"
        else:
            gpus = "no usable GPU" if self.unusable_gpus else "no GPU"
        described = f"{gpus} (via {self.gpu_source}), {self.ram_gib:.0f} GiB RAM, {self.cpu_cores} CPU cores"
        if self.unusable_gpus:
            # Said in the profile choice's reason, so a host that lost a GPU does not silently pick a smaller profile.
            described += " (not counted: " + "; ".join(self.unusable_gpus) + ")"
        return described


def builtin_profiles_dir() -> Path:
    """The shipped ``profiles/``: ``supervisor/profile_data`` when installed, or beside the package in a checkout."""
    here = Path(__file__).resolve().parent.parent  # supervisor/
    installed = here / "profile_data"
    return installed if any(installed.glob("*.yaml")) else here.parent / "profiles"


def load_profiles(extra_dir: Path | None = None) -> dict[str, Profile]:
    """All profiles by name; ``extra_dir`` entries override built-ins."""
    profiles: dict[str, Profile] = {}
    for directory in [builtin_profiles_dir(), extra_dir]:
        if directory is None:
            continue
        if not directory.is_dir():
            raise ConfigError(str(directory), [f"{directory}: profiles directory does not exist"])
        for path in sorted(directory.glob("*.yaml")):
            profile, _ = read_model(path, Profile)
            if profile.name != path.stem:
                problem = f"{path}:1: name: '{profile.name}' must match the file name '{path.stem}'"
                raise ConfigError(str(path), [problem])
            profiles[profile.name] = profile
    return profiles


def closest_profile(host: HostFacts, profiles: dict[str, Profile]) -> tuple[Profile, str]:
    """Pick the profile nearest to ``host``, with the reason in words.

    Order of preference: the same GPU count; then a profile that does not
    declare more VRAM per GPU than the host has; then the nearest VRAM per
    GPU and RAM on a log scale; then the name, so the choice is stable.
    """
    if not profiles:
        raise ValueError("no profiles to choose from")
    host_vram = min(host.gpu_vram_gib) if host.gpu_vram_gib else 0.0

    def distance(profile: Profile) -> tuple[int, int, float, float, str]:
        gpus = profile.hardware.gpus
        vram = min(g.vram_gib for g in gpus) if gpus else 0.0
        overshoot = 1 if vram > host_vram * 1.05 else 0
        vram_gap = abs(math.log2((vram + 1) / (host_vram + 1)))
        ram_gap = abs(math.log2(profile.hardware.ram_gib / max(host.ram_gib, 0.5)))
        return (abs(len(gpus) - len(host.gpu_vram_gib)), overshoot, round(vram_gap, 3), round(ram_gap, 3), profile.name)

    best = min(profiles.values(), key=distance)
    return best, f"detected {host.describe()}; closest profile is '{best.name}' ({best.description})"
