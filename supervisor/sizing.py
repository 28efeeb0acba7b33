"""How much memory a catalog model needs.

The estimate from its GGUF header, or what was learned, whichever is larger.
"""

from __future__ import annotations

from dataclasses import dataclass

from loguru import logger

from .backends.llamacpp import launch_settings
from .config import Config, ModelEntry
from .errors import BadRequest
from .estimate import Estimate, LaunchSettings, estimate
from .gguf_meta import read_gguf_facts
from .learned import LearnedSizes, learned_key
from .profiles import Profile


@dataclass(frozen=True)
class Sizing:
    launch: LaunchSettings
    estimate: Estimate | None
    learned: int | None
    learned_key: str | None
    problem: str | None = None  # why there is no estimate
    fallback: int = 0  # the file size, used when the header cannot be read

    @property
    def need(self) -> int:
        """Bytes to admit with: the larger of estimate and measurement (the file size without an estimate)."""
        estimated = self.estimate.total if self.estimate else self.fallback
        return max(estimated, self.learned or 0)


def size_model(entry: ModelEntry, profile: Profile, learned: LearnedSizes | None = None) -> Sizing:
    launch = launch_settings(entry, profile)
    try:
        facts = read_gguf_facts(entry.gguf)
        key = learned_key(entry.gguf, launch)
        estimated = estimate(facts, launch)
    except Exception as exc:  # an odd header must not stop the daemon: admit with the file size
        fallback = entry.gguf.stat().st_size if entry.gguf.is_file() else 0
        problem = exc.message if isinstance(exc, BadRequest) else f"{type(exc).__name__}: {exc}"
        return Sizing(launch, None, None, None, problem, fallback)
    return Sizing(launch, estimated, learned.get(key) if learned else None, key)


def size_catalog(config: Config, profile: Profile, learned: LearnedSizes | None) -> dict[str, Sizing]:
    """Every model's memory need, logged once with where it comes from."""
    sizings = {}
    for entry in config.models:
        sizing = size_model(entry, profile, learned)
        log = logger.bind(model=entry.name)
        if sizing.estimate is None:
            log.warning("cannot estimate its memory ({}); admitting with the file size", sizing.problem)
        else:
            parts = sizing.estimate.as_dict()
            log.info("needs {:.1f} MiB: weights {:.1f}, KV {:.1f}, compute {:.1f}, overhead {:.1f}{}",
                     sizing.need / 2**20, *(parts[k] / 2**20 for k in ("weights", "kv_cache", "compute", "overhead")),
                     f"; learned {sizing.learned / 2**20:.1f}" if sizing.learned else "")
        sizings[entry.name] = sizing
    return sizings
