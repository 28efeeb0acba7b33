"""The first config file for a new host (``localllmctl config init``; install.sh writes it once)."""

from __future__ import annotations

TEMPLATE = """\
# localllm daemon config, written by `localllmctl config init` for this host.
# Check it with: localllmctl config validate {path}
# Apply catalog changes to the running daemon with: localllmctl apply {path}
profile: {profile}  # {reason}

daemon:
  proxy_listen: 127.0.0.1:8081      # OpenAI-compatible endpoint: http://127.0.0.1:8081/v1
  # Beyond loopback (e.g. 172.17.0.1:8081 for LibreChat in Docker) the proxy needs keys, each of 32+
  # characters: make one with `openssl rand -hex 32`. Clients send "Authorization: Bearer <key>".
  # api_keys: []
  state_dir: {state_dir}  # control socket: {state_dir}/control.sock
  socket_group: localllm            # admin: apply, rollback, logs, and all below (root on this host)
  role_sockets:                     # control sockets that give less (README: Security model)
    operator: {{group: localllm-operators}}   # load and unload, and all a viewer does
    viewer: {{group: localllm-viewers}}       # status, models, events, metrics, history
  startup_timeout: 10m              # how long a model may take to load
  default_ttl: 30m                  # unload a model idle this long (0: never)

# The model catalog. Each entry is one llama-server container, started on demand.
models: []
#  - name: llama-3.1-8b
#    aliases: [llama3]
#    gguf: /srv/models/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf
#    context_size: 8192
#    preload: true
"""


def initial_config(profile: str, reason: str, path: str, state_dir: str = "/var/lib/localllm") -> str:
    return TEMPLATE.format(profile=profile, reason=reason.replace("\n", " "), path=path, state_dir=state_dir)
