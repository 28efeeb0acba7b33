"""What the proxy says about itself and its models, instantly and without loading any.

``GET /v1/models`` (LibreChat builds its model list from it, and checks the names it is
configured with against it): each catalog model with its configured ``context_length`` and a
``meta`` object (backend, state, aliases); with ``daemon.list_aliases``, each alias is an entry of
its own. ``GET /api/tags``, ``GET /api/version`` and ``GET /`` answer as Ollama's do, so that
Ollama-speaking clients pointed at the proxy detect a server and list the catalog.
"""

from __future__ import annotations

import hashlib
import time

from aiohttp import web

from supervisor.fleet.instance import Instance
from supervisor.fleet.owner import Fleet

OLLAMA_VERSION = "0.12.0"  # what GET /api/version reports: a version whose /v1 clients know
OLLAMA_ROOT_TEXT = "Ollama is running"  # GET / of an Ollama server: clients probe for exactly this


class ModelList:
    def __init__(self, fleet: Fleet, list_aliases: bool):
        self.fleet = fleet
        self.list_aliases = list_aliases
        self.created = int(time.time())

    def _entry(self, name: str, instance: Instance) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "localllm",
            "context_length": instance.sizing.launch.context,
            "meta": {
                "backend": instance.entry.backend,
                "state": str(self.fleet.phase(instance)),
                "aliases": list(instance.entry.aliases),
                "alias_of": None if name == instance.name else instance.name,
            },
        }

    async def list_models(self, request: web.Request) -> web.Response:
        data = []
        for instance in self.fleet.instances.values():
            names = instance.entry.names if self.list_aliases else [instance.name]
            data += [self._entry(name, instance) for name in names]
        return web.json_response({"object": "list", "data": data})

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        instance = self.fleet.resolve(name)
        return web.json_response(self._entry(name if self.list_aliases else instance.name, instance))

    async def ollama_tags(self, request: web.Request) -> web.Response:
        """Ollama's model list, for clients that speak its API (LibreChat endpoints named "ollama..."): the catalog."""
        modified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created))
        models = [
            {
                "name": name,
                "model": name,
                "modified_at": modified,
                "size": instance.sizing.need,
                "digest": hashlib.sha256(name.encode()).hexdigest(),
                "details": {
                    "format": "gguf",
                    "family": "",
                    "families": None,
                    "parameter_size": "",
                    "quantization_level": "",
                    "backend": instance.entry.backend,
                },
            }
            for name, instance in self.fleet.instances.items()
        ]
        return web.json_response({"models": models})

    async def ollama_version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": OLLAMA_VERSION})

    async def ollama_root(self, request: web.Request) -> web.Response:
        return web.Response(text=OLLAMA_ROOT_TEXT)
