"""Shared helpers for the unit tests: recorded text and config files in tmp_path."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
LOCALLLMCTL = str(Path(sys.executable).parent / "localllmctl")


@pytest.fixture
def fixture_text():
    return lambda name: (FIXTURES / name).read_text(encoding="utf-8")


@pytest.fixture
def config_file(tmp_path):
    """Write dedented YAML to tmp_path/localllm.yaml; ``m.gguf`` exists beside it."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF")

    def write(text: str, name: str = "localllm.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write
