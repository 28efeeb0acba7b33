"""How much memory a catalog model needs: the estimate from its GGUF header, or what was learned, whichever is larger."""

from __future__ import annotations

from dataclasses import dataclass

from .backends.llamacpp import launch_settings
from .config import ModelEntry
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
