"""The ``librechat.yaml`` block that points LibreChat at this daemon (``localllmctl librechat``).

What LibreChat 0.8.7 needs, from research/librechat-client.md:
- a custom endpoint whose name does not start with "ollama" (LibreChat special-cases those);
- a ``baseURL`` its container can reach;
- ``apiKey``, sent as ``Authorization: Bearer``;
- ``models.fetch``, so it reads ``GET /v1/models``;
- ``titleModel: current_model``, so the title request it sends in parallel does not force
  a swap to another model.
"""

from __future__ import annotations

from supervisor.config.settings import Config
from supervisor.core.errors import BadRequest


def librechat_block(config: Config, name: str, host: str) -> dict:
    if name.lower().startswith("ollama"):
        raise BadRequest(
            f"endpoint name '{name}' starts with 'ollama', which LibreChat treats as an Ollama "
            "server; choose another name"
        )
    port = config.daemon.proxy_listen[0].port
    return {
        "endpoints": {
            "custom": [
                {
                    "name": name,
                    "apiKey": config.daemon.api_keys[0] if config.daemon.api_keys else "no-key",
                    "baseURL": f"http://{host}:{port}/v1",
                    "models": {"default": [m.name for m in config.models], "fetch": True},
                    "titleConvo": True,
                    "titleModel": "current_model",
                    "modelDisplayLabel": name,
                }
            ]
        }
    }
