"""One module per backend says how to run, probe and address its server.

Each backend module offers ``container_spec(...)``, ``readiness_path`` and
``base_url(port)``; ``backend_for(name)`` picks the module for a catalog entry.
"""

from __future__ import annotations

from types import ModuleType

from supervisor.core.backends import llamacpp, ollama

BACKENDS: dict[str, ModuleType] = {"llamacpp": llamacpp, "ollama": ollama}


def backend_for(name: str) -> ModuleType:
    return BACKENDS[name]
