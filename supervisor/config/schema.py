"""Shared pieces of the config and profile schemas, and reading them from files.

``read_model(path, Model)`` is how every YAML file becomes a validated,
immutable pydantic object: YAML errors, unknown keys and wrong types all
become one ``ConfigError`` whose lines read ``FILE:LINE: field: reason``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import ErrorDetails

from supervisor.config.yamldoc import Loc, YamlDoc, YamlProblem, format_loc
from supervisor.core.errors import ConfigError


class Strict(BaseModel):
    """Base of every schema: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> object:
    """``90``, ``"90s"``, ``"5m"``, ``"1h"``, ``"250ms"`` -> seconds as float."""
    if isinstance(value, bool):
        raise ValueError(f"{str(value).lower()} is not a duration (examples: 30, 30s, 5m, 1h, 250ms)")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"'{value}' is not a duration (examples: 30, 30s, 5m, 1h, 250ms)")
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return value


Seconds = Annotated[float, BeforeValidator(parse_duration)]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.I)
_UNIT_BYTES = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "KB": 10**3,
    "KI": 2**10,
    "KIB": 2**10,
    "M": 10**6,
    "MB": 10**6,
    "MI": 2**20,
    "MIB": 2**20,
    "G": 10**9,
    "GB": 10**9,
    "GI": 2**30,
    "GIB": 2**30,
    "T": 10**12,
    "TB": 10**12,
    "TI": 2**40,
    "TIB": 2**40,
}


def parse_size(value: object) -> object:
    """``1073741824``, ``"4GiB"``, ``"600MB"``, ``"1.5G"`` -> bytes as int."""
    if isinstance(value, bool):
        raise ValueError(f"{str(value).lower()} is not a size (examples: 4GiB, 600MB, 1073741824)")
    if isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ValueError(f"'{value}' is not a size (examples: 4GiB, 600MB, 1073741824)")
        return int(float(match.group(1)) * _UNIT_BYTES[(match.group(2) or "").upper()])
    return value


Bytes = Annotated[int, BeforeValidator(parse_size)]

ModelT = TypeVar("ModelT", bound=BaseModel)
Problem = tuple[Loc, str]  # (location, reason): ``describe`` makes it a line of a ConfigError


def read_model(
    path: Path, model: type[ModelT], context: dict[str, Any] | None = None, text: str | None = None
) -> tuple[ModelT, YamlDoc]:
    """Read ``path`` (or ``text``, named ``path``) as YAML and validate it as ``model``; raise ConfigError."""
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(str(path), [f"cannot read file: {exc.strerror or exc}"]) from None
    try:
        doc = YamlDoc.parse(text)
    except YamlProblem as exc:
        where = f"{path}:{exc.line}" if exc.line else str(path)
        raise ConfigError(str(path), [f"{where}: {exc.message}"]) from None
    if not isinstance(doc.data, dict):
        raise ConfigError(str(path), [f"{path}:1: expected a mapping at the top level"])
    try:
        return model.model_validate(doc.data, context=context), doc
    except ValidationError as exc:
        problems = [describe(path, doc, tuple(err["loc"]), _reason(err)) for err in exc.errors(include_url=False)]
        raise ConfigError(str(path), problems) from None


def describe(path: Path, doc: YamlDoc, loc: Loc, reason: str) -> str:
    """One problem line: ``FILE:LINE: field: reason``."""
    line = doc.line_of(loc)
    where = f"{path}:{line}" if line else str(path)
    return f"{where}: {format_loc(loc)}: {reason}"


# Fields whose value a problem line never quotes: it goes to the log, to the CLI and, through apply's
# events, to viewers of the control API.
SECRET_FIELDS = {"api_keys", "control_token", "control_tokens", "token"}


def _reason(err: ErrorDetails) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required key is missing"
    message = err["msg"].removeprefix("Value error, ")
    secret = any(part in SECRET_FIELDS for part in err.get("loc", ()))
    if err["type"] not in ("value_error", "assertion_error") and "input" in err and not secret:
        shown = repr(err["input"])
        if len(shown) <= 60:
            message += f" (got {shown})"
    return message
