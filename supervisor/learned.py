"""Memory each model was measured to use, remembered across restarts.

Keyed by the model file (path, size, modification time) and the launch
settings, so a changed file or context invalidates what was learned. Written
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

from .estimate import LaunchSettings


def learned_key(gguf: Path, launch: LaunchSettings) -> str:
    stat = gguf.stat()
    identity = {"file": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "launch": asdict(launch)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


class LearnedSizes:
    def __init__(self, path: Path):
        self.path = path
        self.problem: str | None = None
        self._entries: dict[str, dict] = self._load()

    def get(self, key: str) -> int | None:
        entry = self._entries.get(key)
        return int(entry["bytes"]) if entry else None

    def record(self, key: str, measured: int, model: str) -> int:
        """Remember the larger of what was learned before and ``measured``; returns it."""
        best = max(measured, self.get(key) or 0)
        self._entries[key] = {"bytes": best, "model": model, "measured_at": time.time()}
        self._save()
        return best

    def _load(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or not all(
                    isinstance(v, dict) and type(v.get("bytes")) is int for v in data.values()):
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
