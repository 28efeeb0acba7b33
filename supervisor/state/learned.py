"""Memory each model was measured to use at its peak, remembered across restarts.

Keyed by the model (its file's path, size and modification time, or an Ollama
tag), the launch settings and the image, so a changed file, context or server
build invalidates what was learned. A size goes up as soon as a higher peak is
seen, and comes down only after ``LOWER_RUNS`` runs in a row peaked lower (to
the highest of them): a model measured once during an unusual load is not
over-charged forever, and one quiet run does not under-charge it. Written
atomically (temp file, fsync, rename); a corrupt file is set aside, not
trusted and not lost.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from supervisor.core.estimate import LaunchSettings

LOWER_RUNS = 3  # runs in a row that peaked lower before a learned size comes down


def learned_key(model: Path | str, launch: LaunchSettings, image: str) -> str:
    """What a measurement is valid for: the model file (or Ollama tag), how it is launched, and by which build."""
    if isinstance(model, Path):
        stat = model.stat()
        what: dict = {"file": str(model.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    else:
        what = {"tag": model}
    identity = {**what, "launch": asdict(launch), "image": image}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def after_run(learned: int | None, lower: list[int], peak: int) -> tuple[int, list[int]]:
    """Pure: the learned size and the lower peaks counted so far, once a run peaked at ``peak``."""
    if learned is None or peak >= learned:
        return peak, []
    lower = [*lower, peak]
    if len(lower) >= LOWER_RUNS:
        return max(lower), []
    return learned, lower


class LearnedSizes:
    def __init__(self, path: Path):
        self.path = path
        self.problem: str | None = None
        self._entries: dict[str, dict] = self._load()

    def get(self, key: str) -> int | None:
        entry = self._entries.get(key)
        return int(entry["bytes"]) if entry else None

    def record(self, key: str, measured: int, model: str) -> int:
        """A running model peaked at ``measured``: raise what was learned to it; returns what is learned now."""
        learned = self.get(key)
        if learned is not None and measured <= learned:
            return learned
        self._entries[key] = {"bytes": measured, "model": model, "measured_at": time.time(), "lower": []}
        self._save()
        return measured

    def finish_run(self, key: str, peak: int, model: str) -> int:
        """A run ended with ``peak`` as its highest use: count it towards lowering; returns what is learned now."""
        entry = self._entries.get(key, {})
        learned, lower = after_run(self.get(key), list(entry.get("lower", [])), peak)
        self._entries[key] = {"bytes": learned, "model": model, "measured_at": time.time(), "lower": lower}
        self._save()
        return learned

    def _load(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or not all(_valid_entry(v) for v in data.values()):
                raise ValueError("unexpected structure")
            return data
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.time_ns()}")
            self.path.replace(aside)
            self.problem = f"learned sizes file {self.path} was unreadable ({exc}); moved it to {aside}"
            return {}

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w") as out:
            json.dump(self._entries, out, indent=1, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(self.path)


def _valid_entry(entry: object) -> bool:
    if not isinstance(entry, dict) or type(entry.get("bytes")) is not int:
        return False
    lower = entry.get("lower", [])
    return isinstance(lower, list) and all(type(peak) is int for peak in lower)
