"""Config generations: every applied config is kept, numbered, with its outcome.

The store lives in ``<state_dir>/generations/``: one YAML file per generation
(the config text as applied, its secrets replaced by ``"<redacted>"``), the
secrets apart in ``secrets/<number>.json``, and ``index.json`` with each one's
status. Every file is 0600 and every write atomic (temp file, fsync, rename),
so a crash or a full disk leaves the previous state whole. An unreadable index
is set aside and the store starts afresh; nothing is deleted.

``plan_change`` is the pure part: which running models keep their container,
which must be replaced, which go, which are new. ``split_secrets`` and
``restore_secrets`` are pure too: a rollback gets back the text exactly as applied.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

import yaml

from supervisor.core.errors import StateWriteFailed

KEEP = 20  # generations kept; the active and last-good ones are never pruned
SECRET_SETTINGS = ("api_keys", "control_token", "control_tokens")  # under daemon:; a token's role is not secret
PLACEHOLDER = "<redacted>"
NOT_STORED = "# localllm did not store this text: it is not valid YAML, so its secrets could not be told apart\n"


class GenerationStatus(StrEnum):
    """A generation's outcome, as ``localllmctl history`` and ``GET /history`` show it."""

    PENDING = "pending"  # being applied (or the daemon stopped before it was decided)
    GOOD = "good"  # live; it became last-good
    FAILED = "failed"  # failed its health gate and was reverted to last-good (or a preload failed at startup)
    INVALID = "invalid"  # refused before anything changed: invalid, or it needs a restart


@dataclass
class Generation:
    number: int
    created_at: float
    source: str  # where the config came from: a path, "sighup", "rollback to N"
    status: GenerationStatus
    hashes: dict[str, str] = field(default_factory=dict)  # model -> config hash of its wanted container
    reason: str = ""
    secrets: bool = False  # its secrets are in secrets/<number>.json
    path: str = ""  # the file it was read from: relative paths in it are relative to that file's directory

    def __post_init__(self) -> None:
        with contextlib.suppress(ValueError):  # a status another version wrote stays as it was written
            self.status = GenerationStatus(self.status)


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


def split_secrets(text: str) -> tuple[str, dict[str, str]]:
    """Pure: ``text`` with every secret's value replaced by ``"<redacted>"``, and the secrets by where they were
    (``daemon.api_keys[0]`` -> its source text). Comments and layout stay, so a diff of two stored texts reads."""
    try:
        spans = [span for span in _secret_spans(text) if span[3] != PLACEHOLDER]  # redacted already: nothing new
    except yaml.YAMLError:
        return NOT_STORED, {}
    if not spans:
        return text, {}
    secrets = {path: text[start:end] for path, start, end, _ in spans}
    redacted = _replace(text, [(start, end, json.dumps(PLACEHOLDER)) for _, start, end, _ in spans])
    if _splits_cleanly(text, redacted, secrets, exact=True):
        return redacted, secrets
    # Spans that cannot be cut out cleanly (duplicate keys, say): the parsed config, dumped without its comments.
    try:
        data = yaml.safe_load(text)
        secrets = {}
        data["daemon"] = {
            k: _blank(v, f"daemon.{k}", secrets) if k in SECRET_SETTINGS else v for k, v in data["daemon"].items()
        }
        redacted = yaml.safe_dump(data, sort_keys=False)
    except (yaml.YAMLError, TypeError, ValueError):
        return NOT_STORED, {}
    return (redacted, secrets) if _splits_cleanly(text, redacted, secrets, exact=False) else (NOT_STORED, {})


def restore_secrets(redacted: str, secrets: dict[str, str]) -> str:
    """Pure: the text ``split_secrets`` was given. Raises ValueError if ``secrets`` do not fit ``redacted``."""
    if not secrets:
        return redacted
    holes = [(path, start, end) for path, start, end, value in _secret_spans(redacted) if value == PLACEHOLDER]
    if sorted(path for path, _, _ in holes) != sorted(secrets):
        raise ValueError("the stored secrets do not fit the stored text")
    return _replace(redacted, [(start, end, secrets[path]) for path, start, end in holes])


def _splits_cleanly(text: str, redacted: str, secrets: dict[str, str], exact: bool) -> bool:
    try:
        left = [(path, value) for path, _, _, value in _secret_spans(redacted)]
        back = restore_secrets(redacted, secrets)
    except (yaml.YAMLError, ValueError):
        return False
    if sorted(left) != sorted((path, PLACEHOLDER) for path in secrets):
        return False
    return back == text if exact else yaml.safe_load(back) == yaml.safe_load(text)


def _secret_spans(text: str) -> list[tuple[str, int, int, str]]:
    """(path, start, end, value) of each secret scalar in ``text``, once each (an alias is its anchor's node)."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    found, seen = [], set()
    for daemon in _values(root, "daemon"):
        for key in SECRET_SETTINGS:
            for node in _values(daemon, key):
                for path, scalar in _scalars(node, f"daemon.{key}", set()):
                    if id(scalar) in seen or scalar.tag.endswith(":null"):
                        continue
                    seen.add(id(scalar))
                    start, end = scalar.start_mark.index, scalar.end_mark.index
                    source = text[start:end]
                    start += len(re.match(r"(?:[&!]\S*\s+)*", source).group())  # keep an anchor and a tag
                    end -= len(source) - len(source.rstrip())  # a block scalar's span ends with its line breaks
                    found.append((path, start, end, scalar.value))
    return found


def _values(node, key: str):
    """The values of ``key`` in a mapping node, also through merge keys (``<<: *base``)."""
    if not isinstance(node, yaml.MappingNode):
        return
    for name, value in node.value:
        if name.tag.endswith(":merge"):
            for merged in value.value if isinstance(value, yaml.SequenceNode) else [value]:
                yield from _values(merged, key)
        elif isinstance(name, yaml.ScalarNode) and name.value == key:
            yield value


def _scalars(node, path: str, visiting: set):
    if id(node) in visiting:  # a recursive alias
        return
    if isinstance(node, yaml.ScalarNode):
        yield path, node
        return
    visiting = visiting | {id(node)}
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _scalars(item, f"{path}[{index}]", visiting)
    elif isinstance(node, yaml.MappingNode):
        for name, value in node.value:
            if not (isinstance(name, yaml.ScalarNode) and name.value == "role"):
                yield from _scalars(value, f"{path}.{getattr(name, 'value', '?')}", visiting)


def _blank(value, path: str, secrets: dict[str, str]):
    if isinstance(value, list):
        return [_blank(item, f"{path}[{index}]", secrets) for index, item in enumerate(value)]
    if isinstance(value, dict):
        return {k: v if k == "role" else _blank(v, f"{path}.{k}", secrets) for k, v in value.items()}
    if value is None:
        return None
    secrets[path] = json.dumps(value)
    return PLACEHOLDER


def _replace(text: str, spans: list[tuple[int, int, str]]) -> str:
    for start, end, new in sorted(spans, reverse=True):
        text = text[:start] + new + text[end:]
    return text


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
        """The stored text, its secrets redacted (for diffs); raises OSError."""
        return self._path(number).read_text()

    def config_text(self, number: int) -> str:
        """The text as it was applied, secrets included (to apply it again); raises OSError or ValueError."""
        generation = self.get(number)
        if generation is None or not generation.secrets:
            return self.text_of(number)
        secrets = json.loads(self._secrets_path(number).read_text())
        return restore_secrets(self.text_of(number), secrets)

    def as_list(self) -> list[dict]:
        return [
            {**asdict(g), "active": g.number == self.active, "last_good": g.number == self.last_good}
            for g in self.generations
        ]

    # -- writing ----------------------------------------------------------------

    def record(self, text: str, source: str, hashes: dict[str, str], path: Path | None = None) -> Generation:
        """Save a new pending generation (``text``, read from ``path``); raises StateWriteFailed and changes
        nothing if it cannot."""
        on_disk = [int(p.stem) for p in self.directory.glob("[0-9]*.yaml") if p.stem.isdigit()]
        number = max([g.number for g in self.generations] + on_disk, default=0) + 1  # never overwrite a file
        redacted, secrets = split_secrets(text)
        generation = Generation(
            number,
            time.time(),
            source,
            GenerationStatus.PENDING,
            hashes,
            secrets=bool(secrets),
            path=str(path.resolve()) if path else "",
        )
        try:
            if secrets:
                self._write(self._secrets_path(number), json.dumps(secrets))
            self._write(self._path(number), redacted)
            self.generations.append(generation)
            self._save_index()
        except StateWriteFailed:
            if self.generations and self.generations[-1] is generation:
                self.generations.pop()
            self._remove_files(number)
            raise
        return generation

    def mark(self, number: int, status: GenerationStatus, reason: str = "") -> None:
        """Record an outcome; if the index cannot be written, memory and disk stay as they were."""
        generation = self.get(number)
        assert generation is not None, f"no generation {number}"
        status = GenerationStatus(status)  # a misspelt status fails here, not in every later reader
        before = (generation.status, generation.reason, self.active, self.last_good, list(self.generations))
        generation.status, generation.reason = status, reason
        if status is GenerationStatus.GOOD:
            self.active = self.last_good = number
        pruned = self._prune()
        try:
            self._save_index()
        except StateWriteFailed:
            generation.status, generation.reason, self.active, self.last_good, self.generations = before
            raise
        for old in pruned:  # only once the index no longer lists them
            self._remove_files(old.number)

    def set_active(self, number: int) -> None:
        self.active = number
        self._save_index()

    def move_secrets_out(self) -> list[int]:
        """Generations stored whole by an older localllm: keep their secrets apart too. Returns their numbers."""
        moved = []
        for path in sorted(self.directory.glob("[0-9]*.yaml")):
            generation = self.get(int(path.stem)) if path.stem.isdigit() else None
            if not path.stem.isdigit() or (generation is not None and generation.secrets):
                continue
            text = path.read_text()
            redacted, secrets = split_secrets(text)
            if not secrets and redacted == text:
                continue
            if secrets:
                self._write(self._secrets_path(int(path.stem)), json.dumps(secrets))
            self._write(path, redacted)
            if generation is not None:
                generation.secrets = bool(secrets)
            moved.append(int(path.stem))
        if moved:
            self._save_index()
        return moved

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
                self.problem = (
                    f"generation index {index} is unreadable ({exc}) and could not be moved aside "
                    f"({move_failed.strerror or move_failed}); history starts empty"
                )
                return
            self.problem = f"generation index {index} was unreadable ({exc}); moved it to {aside}"

    def _save_index(self) -> None:
        data = {
            "active": self.active,
            "last_good": self.last_good,
            "generations": [asdict(g) for g in self.generations],
        }
        self._write(self.directory / "index.json", json.dumps(data, indent=1))

    def _path(self, number: int) -> Path:
        return self.directory / f"{number:06d}.yaml"

    def _secrets_path(self, number: int) -> Path:
        return self.directory / "secrets" / f"{number:06d}.json"

    def _remove_files(self, number: int) -> None:
        for path in (self._path(number), self._secrets_path(number)):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def _write(self, path: Path, text: str) -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.parent.chmod(0o700)
            # 0600 whatever the umask: the stored secrets are api_keys and control tokens
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
