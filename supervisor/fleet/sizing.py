"""How much memory a catalog model needs.

A declared ``memory:`` wins. Otherwise the estimate from its GGUF header, or
what was learned, whichever is larger. An Ollama model has no file here: it is
admitted with what was learned, else a placeholder until Ollama reports its
size (``/api/show`` once present, ``/api/ps`` once loaded).
"""

from __future__ import annotations

from dataclasses import dataclass

from loguru import logger

from supervisor.config.profiles import Profile
from supervisor.config.settings import Config, ModelEntry, OllamaSettings
from supervisor.core.backends import ollama
from supervisor.core.backends.llamacpp import launch_settings
from supervisor.core.errors import ModelFileUnreadable
from supervisor.core.estimate import Estimate, LaunchSettings, estimate
from supervisor.runtime.gguf_meta import read_gguf_facts
from supervisor.state.learned import LearnedSizes, learned_key


@dataclass(frozen=True)
class Sizing:
    launch: LaunchSettings
    estimate: Estimate | None
    learned: int | None
    learned_key: str | None
    problem: str | None = None  # why there is no estimate
    fallback: int = 0  # the file size, used when the header cannot be read (Ollama: a placeholder)
    declared: int | None = None  # the catalog's memory:

    @property
    def need(self) -> int:
        """Bytes to admit with: as declared, or the larger of estimate and measurement (else the fallback)."""
        if self.declared:
            return self.declared
        estimated = self.estimate.total if self.estimate else self.fallback
        return max(estimated, self.learned or 0)


OLLAMA_PLACEHOLDER = 4 * 2**30  # an Ollama model never seen: admitted as 4 GiB until Ollama tells its size


def size_model(
    entry: ModelEntry,
    profile: Profile,
    learned: LearnedSizes | None = None,
    ollama_settings: OllamaSettings | None = None,
) -> Sizing:
    if entry.backend == "ollama":
        settings = ollama_settings or OllamaSettings()
        launch = ollama.launch_settings(settings, profile)
        key = learned_key(str(entry.tag), launch, settings.image or profile.defaults.images.ollama)
        return Sizing(
            launch,
            None,
            learned.get(key) if learned else None,
            key,
            "Ollama reports its size once it has the model",
            OLLAMA_PLACEHOLDER,
            entry.memory,
        )
    launch = launch_settings(entry, profile)
    try:
        facts = read_gguf_facts(entry.gguf)
        key = learned_key(entry.gguf, launch, entry.image or profile.defaults.images.llamacpp)
        estimated = estimate(facts, launch)
    except Exception as exc:  # an odd header must not stop the daemon: admit with the file size
        fallback = entry.gguf.stat().st_size if entry.gguf.is_file() else 0
        problem = exc.message if isinstance(exc, ModelFileUnreadable) else f"{type(exc).__name__}: {exc}"
        return Sizing(launch, None, None, None, problem, fallback, entry.memory)
    return Sizing(launch, estimated, learned.get(key) if learned else None, key, declared=entry.memory)


def size_catalog(config: Config, profile: Profile, learned: LearnedSizes | None) -> dict[str, Sizing]:
    """Every model's memory need, logged once with where it comes from."""
    sizings = {}
    for entry in config.models:
        sizing = size_model(entry, profile, learned, config.ollama)
        log = logger.bind(model=entry.name)
        if sizing.declared:
            log.info("needs {:.1f} MiB, as declared", sizing.need / 2**20)
        elif entry.backend == "ollama":
            log.info(
                "needs {:.1f} MiB ({})",
                sizing.need / 2**20,
                "learned" if sizing.learned else "a placeholder until Ollama reports its size",
            )
        elif sizing.estimate is None:
            log.warning("cannot estimate its memory ({}); admitting with the file size", sizing.problem)
        else:
            parts = sizing.estimate.as_dict()
            log.info(
                "needs {:.1f} MiB: weights {:.1f}, KV {:.1f}, compute {:.1f}, overhead {:.1f}{}",
                sizing.need / 2**20,
                *(parts[k] / 2**20 for k in ("weights", "kv_cache", "compute", "overhead")),
                f"; learned {sizing.learned / 2**20:.1f}" if sizing.learned else "",
            )
        sizings[entry.name] = sizing
    return sizings
