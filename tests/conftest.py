"""Fixtures for every test, unit and integration."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def open_dir():
    """A directory every user may search (pytest's own are 0700), so only what is made in it decides who gets
    in: a socket's own mode and group, as another user sees them."""
    path = Path(tempfile.mkdtemp(prefix="localllm-open-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
