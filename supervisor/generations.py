"""Config generations: every applied config is kept, numbered, with its outcome.

The store lives in ``<state_dir>/generations/``: one YAML file per generation
(the config text exactly as applied) and ``index.json`` with each one's status.
Every write is atomic (temp file, fsync, rename), so a crash or a full disk
leaves the previous state whole. An unreadable index is set aside and the
store starts afresh; nothing is deleted.

``plan_change`` is the pure part: which running models keep their container,
which must be replaced, which go, which are new.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import StateWriteFailed

KEEP = 20  # generations kept; the active and last-good ones are never pruned


@dataclass
class Generation:
    number: int
    created_at: float
    source: str  # where the config came from: a path, "sighup", "rollback to N"
    status: str  # pending, good, failed, reverted
    hashes: dict[str, str] = field(default_factory=dict)  # model -> config hash of its wanted container
    reason: str = ""


@dataclass(frozen=True)
class ChangePlan:
    keep: tuple[str, ...]  # running, spec unchanged
    replace: tuple[str, ...]  # running, spec changed
    remove: tuple[str, ...]  # running, no longer in the catalog
    add: tuple[str, ...]  # new in the catalog
    update: tuple[str, ...]  # in both catalogs, not running: only the catalog entry changes

    @property
    def changes_containers(self) -> bool:
        return bool(self.replace or self.remove)


def plan_change(running: dict[str, str], wanted: dict[str, str], old_models: set[str]) -> ChangePlan:
    """Pure: ``running`` and ``wanted`` map model -> config hash; ``old_models`` is the old catalog."""
    keep = tuple(sorted(m for m, h in running.items() if wanted.get(m) == h))
    replace = tuple(sorted(m for m, h in running.items() if m in wanted and wanted[m] != h))
    remove = tuple(sorted(m for m in running if m not in wanted))
    add = tuple(sorted(m for m in wanted if m not in old_models))
    update = tuple(sorted(m for m in wanted if m in old_models and m not in running))
    return ChangePlan(keep, replace, remove, add, update)


class GenerationStore:
    def __init__(self, directory: Path):
        self.directory = directory
        self.problem: str | None = None
        self.generations: list[Generation] = []
        self.active: int | None = None
        self.last_good: int | None = None
        self._load()

    # -- reading ----------------------------------------------------------------

    def get(self, number: int) -> Generation | None:
        return next((g for g in self.generations if g.number == number), None)

    def text_of(self, number: int) -> str:
        return (self.directory / f"{number:06d}.yaml").read_text()

    def as_list(self) -> list[dict]:
        return [{**asdict(g), "active": g.number == self.active, "last_good": g.number == self.last_good}
                for g in self.generations]

    # -- writing ----------------------------------------------------------------

    def record(self, text: str, source: str, hashes: dict[str, str]) -> Generation:
        """Save a new pending generation; raises StateWriteFailed and changes nothing if it cannot."""
        on_disk = [int(p.stem) for p in self.directory.glob("[0-9]*.yaml") if p.stem.isdigit()]
        number = max([g.number for g in self.generations] + on_disk, default=0) + 1  # never overwrite a file
        generation = Generation(number, time.time(), source, "pending", hashes)
        self._write(self.directory / f"{number:06d}.yaml", text)
        self.generations.append(generation)
        try:
            self._save_index()
        except StateWriteFailed:
            self.generations.pop()
            (self.directory / f"{number:06d}.yaml").unlink(missing_ok=True)
            raise
        return generation

    def mark(self, number: int, status: str, reason: str = "") -> None:
        """Record an outcome; if the index cannot be written, memory and disk stay as they were."""
        generation = self.get(number)
        assert generation is not None, f"no generation {number}"
        before = (generation.status, generation.reason, self.active, self.last_good, list(self.generations))
        generation.status, generation.reason = status, reason
        if status == "good":
            self.active = self.last_good = number
        pruned = self._prune()
        try:
            self._save_index()
        except StateWriteFailed:
            generation.status, generation.reason, self.active, self.last_good, self.generations = before
            raise
        for old in pruned:  # only once the index no longer lists them
            (self.directory / f"{old.number:06d}.yaml").unlink(missing_ok=True)

    def set_active(self, number: int) -> None:
        self.active = number
        self._save_index()

    # -- files ------------------------------------------------------------------

    def _load(self) -> None:
        index = self.directory / "index.json"
        try:
            data = json.loads(index.read_text())
            self.generations = [Generation(**g) for g in data["generations"]]
            self.active, self.last_good = data.get("active"), data.get("last_good")
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.generations, self.active, self.last_good = [], None, None
            aside = index.with_name(f"index.json.corrupt-{time.time_ns()}")
            try:
                index.replace(aside)
            except OSError as move_failed:
                self.problem = (f"generation index {index} is unreadable ({exc}) and could not be moved aside "
                                f"({move_failed.strerror or move_failed}); history starts empty")
                return
            self.problem = f"generation index {index} was unreadable ({exc}); moved it to {aside}"

    def _save_index(self) -> None:
        data = {"active": self.active, "last_good": self.last_good,
                "generations": [asdict(g) for g in self.generations]}
        self._write(self.directory / "index.json", json.dumps(data, indent=1))

    def _write(self, path: Path, text: str) -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # 0600 whatever the umask: a stored config holds api_keys and control_token
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600), "w") as out:
                os.fchmod(out.fileno(), 0o600)  # a leftover .tmp from an older version keeps its mode otherwise
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            tmp.replace(path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StateWriteFailed(f"cannot write {path}: {exc.strerror or exc}; nothing was changed") from None

    def _prune(self) -> list[Generation]:
        """Drop the oldest generations beyond KEEP from memory (never active or last-good); returns them."""
        protected = {self.active, self.last_good}
        pruned = []
        while len(self.generations) > KEEP:
            oldest = next((g for g in self.generations if g.number not in protected), None)
            if oldest is None:
                break
            self.generations = [g for g in self.generations if g is not oldest]
            pruned.append(oldest)
        return pruned
