"""Bad config files and the problems they must produce, shared by load_config and CLI tests.

Each case: YAML text (dedented; ``m.gguf`` exists beside it) and the expected
problems as (line or set of acceptable lines, text the problem must contain).
``{dir}`` in the text stands for the config file's directory.
"""

from __future__ import annotations

import pytest

KNOWN = "known: auto, cpu-only, gpu-1x24g, gpu-1x80g, gpu-1x8g, gpu-2x24g"

BAD_CONFIGS = [
    pytest.param(
        """\
        models:
          - name: a
            gguf: m.gguf
            filters:
              strip_params: [reasoning_effort, model]
        """,
        [(5, "'model' cannot be stripped: the proxy needs it")],
        id="filter-strips-model",
    ),
    pytest.param(
        """\
        models:
          - name: a
            gguf: m.gguf
            filters:
              set_params: {temperature: 0.2, stream: false}
        """,
        [(5, "'stream' cannot be set")],
        id="filter-sets-stream",
    ),
    pytest.param(
        """\
        models:
          - name: a
            gguf: m.gguf
            max_concurrent: 0
            loading_progress: dots
        """,
        [
            (4, "max_concurrent: Input should be greater than or equal to 1"),
            (5, "loading_progress: Input should be 'off', 'comments' or 'reasoning'"),
        ],
        id="serving-limits",
    ),
    pytest.param(
        """\
        default_model: b
        models:
          - name: a
            gguf: m.gguf
        """,
        [(1, "default_model: 'b' is not a model or alias of the catalog")],
        id="default-model-unknown",
    ),
    pytest.param(
        """\
        models:
          - name: a
            gguf: m.gguf
            context_size: 4096: 8192
        """,
        [(4, "YAML syntax error: mapping values are not allowed here")],
        id="yaml-syntax-mapping",
    ),
    pytest.param(
        "profile: cpu-only\nmodels:\n\t- name: a\n",
        [(3, "YAML syntax error: found character '\\t' that cannot start any token")],
        id="yaml-syntax-tab",
    ),
    pytest.param("- a\n", [(1, "expected a mapping at the top level")], id="top-level-list"),
    pytest.param(
        """\
        profile: cpu-only
        colour: blue
        models: []
        """,
        [(2, "colour: unknown key")],
        id="unknown-top-level-key",
    ),
    pytest.param(
        """\
        models:
          - name: a
            gguf: m.gguf
            temperature: 0.7
        """,
        [(4, "models[0].temperature: unknown key")],
        id="unknown-model-key",
    ),
    pytest.param(
        """\
        daemon:
          instance: test
          listen: 127.0.0.1:9000
        """,
        [(3, "daemon.listen: unknown key")],
        id="unknown-daemon-key",
    ),
    pytest.param(
        """\
        models:
          - name: a
            gguf: m.gguf
            sampling:
              temperature: 0.7
        """,
        [(4, "models[0].sampling: unknown key")],
        id="unknown-key-with-block-value",
    ),
    pytest.param(
        """\
        models:
          - name: a
            gguf: m.gguf
            context_size: "big"
        """,
        [
            (
                4,
                "models[0].context_size: Input should be a valid integer, unable to parse string as an integer (got 'big')",
            )
        ],
        id="context-size-string",
    ),
    pytest.param(
        """\
        models:
          - name: a
            gguf: m.gguf
            context_size: 64
        """,
        [(4, "models[0].context_size: Input should be greater than or equal to 128")],
        id="context-size-too-small",
    ),
    pytest.param(
        """\
        models:
          - name: a
            gguf: m.gguf
            preload: [1]
        """,
        [(4, "models[0].preload: Input should be a valid boolean (got [1])")],
        id="preload-list",
    ),
    pytest.param(
        """\
        models:
          - name: a
            gguf: m.gguf
            ttl: abc
        """,
        [(4, "models[0].ttl: 'abc' is not a duration (examples: 30, 30s, 5m, 1h, 250ms)")],
        id="ttl-not-duration",
    ),
    pytest.param(
        """\
        models:
          - name: a
            gguf: m.gguf
            ttl: true
        """,
        [(4, "models[0].ttl: ")],
        id="ttl-boolean",
    ),
    pytest.param(
        """\
        daemon:
          proxy_listen: localhost
        """,
        [(2, "daemon.proxy_listen: 'localhost' is not HOST:PORT")],
        id="listen-without-port",
    ),
    pytest.param(
        """\
        models:
          - name: a
            gguf: m.gguf
          - name: a
            gguf: m.gguf
        """,
        [(4, "models[1].name: duplicate model name 'a' (also models[0])")],
        id="duplicate-name",
    ),
    pytest.param(
        """\
        models:
          - name: a
            aliases: [b]
            gguf: m.gguf
          - name: b
            gguf: m.gguf
        """,
        [(5, "models[1].name: duplicate model name 'b' (also models[0])")],
        id="name-clashes-with-alias",
    ),
    pytest.param(
        """\
        models:
          - name: a
            gguf: m.gguf
          - name: c
            aliases:
              - x
              - a
            gguf: m.gguf
        """,
        [(7, "models[1].aliases[1]: duplicate model name 'a' (also models[0])")],
        id="alias-clashes-with-name",
    ),
    pytest.param(
        """\
        models:
          - name: a
            gguf: m.gguf
          - name: b
            gguf: models/nope.gguf
        """,
        [(5, "models[1].gguf: model file {dir}/models/nope.gguf does not exist")],
        id="missing-model-file",
    ),
    pytest.param(
        """\
        models:
          - name: a
            gguf: .
        """,
        [(3, "models[0].gguf: model file {dir} is not a file")],
        id="model-file-is-directory",
    ),
    pytest.param(
        """\
        daemon:
          proxy_listen: 127.0.0.1:8081
          control_listen: 127.0.0.1:8081
          control_token: 0123456789abcdef0123456789abcdef
        """,
        [(3, "control_listen 127.0.0.1:8081 uses a proxy_listen port")],
        id="control-listen-on-proxy-port",
    ),
    pytest.param(
        """\
        daemon:
          control_listen: 127.0.0.1:8090
        """,
        [(2, "daemon.control_listen: control_listen needs control_tokens (or control_token, an admin token)")],
        id="control-listen-without-token",
    ),
    pytest.param(
        """\
        daemon:
          control_listen: 127.0.0.1:8090
          control_token: short
        """,
        [
            (
                3,
                "daemon.control_token: a control token needs at least 32 characters, this one has 5 (make one "
                "with: openssl rand -hex 32)",
            )
        ],
        id="control-token-too-short",
    ),
    pytest.param(
        """\
        daemon:
          control_listen: 127.0.0.1:8090
          control_tokens:
            - {token: 0123456789abcdef, role: viewer}
        """,
        [(4, "daemon.control_tokens[0].token: a control token needs at least 32 characters, this one has 16")],
        id="control-token-of-the-old-length",
    ),
    pytest.param(
        """\
        daemon:
          control_listen: 127.0.0.1:8090
          control_tokens:
            - {token: 0123456789abcdef0123456789abcdef, role: root}
        """,
        [(4, "daemon.control_tokens[0].role: Input should be 'viewer', 'operator' or 'admin'")],
        id="control-token-unknown-role",
    ),
    pytest.param(
        """\
        daemon:
          control_listen: 0.0.0.0:8090
          control_token: 0123456789abcdef0123456789abcdef
        """,
        [
            (
                2,
                "daemon.control_listen: control_listen 0.0.0.0:8090 is not a loopback address: it needs control_tls "
                "(cert and key)",
            )
        ],
        id="control-listen-off-loopback-without-tls",
    ),
    pytest.param(
        """\
        daemon:
          control_listen: 10.0.0.5:8090
          control_token: 0123456789abcdef0123456789abcdef
          control_tls: {cert: missing-cert.pem, key: missing-key.pem}
        """,
        [
            (4, "daemon.control_tls.cert: cannot read {dir}/missing-cert.pem: No such file or directory"),
            (4, "daemon.control_tls.key: cannot read {dir}/missing-key.pem: No such file or directory"),
        ],
        id="control-tls-files-missing",
    ),
    pytest.param(
        """\
        daemon:
          api_keys: [0123456789abcdef0123456789abcdef]
          control_listen: 127.0.0.1:8090
          control_token: 0123456789abcdef0123456789abcdef
          control_tokens:
            - {token: 0123456789abcdef0123456789abcdef, role: viewer}
        """,
        [
            (4, "daemon.control_token: this token is also one of daemon.api_keys"),
            (6, "daemon.control_tokens[0].token: the same token as daemon.control_token: each token gives one role"),
            (6, "daemon.control_tokens[0].token: this token is also one of daemon.api_keys"),
        ],
        id="control-tokens-shared",
    ),
    pytest.param(
        """\
        daemon:
          state_dir: /srv/llm
          role_sockets:
            viewer: {path: /srv/llm/control.sock, mode: "0666"}
            operator: {}
        """,
        [(5, "daemon.role_sockets.operator: a socket of mode 0660 needs 'group'")],
        id="role-socket-without-group",
    ),
    pytest.param(
        """\
        daemon:
          state_dir: /srv/llm
          role_sockets:
            viewer: {path: /srv/llm/control.sock, mode: "0666"}
        """,
        [(4, "daemon.role_sockets.viewer.path: /srv/llm/control.sock is also the admin socket")],
        id="role-socket-on-the-admin-socket",
    ),
    pytest.param(
        """\
        daemon:
          role_sockets:
            admin: {group: wheel}
        """,
        [(2, "daemon.role_sockets: the admin socket is daemon.control_socket, with group daemon.socket_group")],
        id="role-socket-for-admin",
    ),
    pytest.param(
        """\
        profile: cpu-only
        models: []
        profile: gpu-1x8g
        """,
        [(3, "duplicate key 'profile' (first at line 1)")],
        id="duplicate-top-level-key",
    ),
    pytest.param(
        """\
        models:
          - name: a
            gguf: m.gguf
            gguf: other.gguf
        """,
        [(4, "duplicate key 'gguf' (first at line 3)")],
        id="duplicate-model-key",
    ),
    pytest.param(
        """\
        models: []
        profile: gpu-9x9g
        """,
        [(2, f"profile: unknown profile 'gpu-9x9g' ({KNOWN})")],
        id="unknown-profile",
    ),
    pytest.param(
        """\
        profile: gpu-9x9g
        models:
          - name: a
            gguf: m.gguf
          - name: a
            gguf: gone.gguf
        """,
        [
            (5, "models[1].name: duplicate model name 'a' (also models[0])"),
            (6, "models[1].gguf: model file {dir}/gone.gguf does not exist"),
            (1, "profile: unknown profile 'gpu-9x9g'"),
        ],
        id="every-cross-check-problem-reported",
    ),
    pytest.param(
        """\
        models:
          - name: a
            gguf: m.gguf
            extra_args: ["--threads", "8", "--ctx-size=65536"]
        """,
        [
            (
                4,
                "models[0].extra_args: '--ctx-size' is set by localllm, which sizes the model's memory by it; "
                "set context_size instead",
            )
        ],
        id="extra-args-override-a-pinned-flag",
    ),
    pytest.param(
        """\
        models:
          - name: a
            gguf: m.gguf
            extra_args: ["-ngl", "10"]
        """,
        [
            (
                4,
                "models[0].extra_args: '-ngl' is set by localllm, which sizes the model's memory by it; "
                "set gpu_layers instead",
            )
        ],
        id="extra-args-short-pinned-flag",
    ),
    pytest.param(
        """\
        models:
          - name: a
            gguf: m.gguf
            flash_attention: false
            cache_type_v: q8_0
        """,
        [
            (
                {2, 3},
                "models[0]: cache_type_v: q8_0 needs flash_attention: true (llama.cpp refuses a quantized V "
                "cache without flash attention)",
            )
        ],
        id="quantized-v-cache-without-flash-attention",
    ),
    pytest.param(
        """\
        models:
          - name: a
            gguf: m.gguf
            extra_args: ["--ctx_size", "65536"]
        """,
        [(4, "models[0].extra_args: '--ctx-size' is set by localllm")],
        id="extra-args-pinned-flag-with-underscores",
    ),
    # The rules that hold with or without daemon.policy (supervisor/config/policy.py).
    pytest.param(
        """\
        models:
          - name: a
            gguf: m.gguf
            extra_args:
              - --threads
              - "2"
              - --api_key
              - secret
        """,
        [(7, "models[0].extra_args[2]: '--api_key' is never allowed: localllm's proxy does the authentication")],
        id="extra-args-always-denied-without-a-policy",
    ),
    pytest.param(
        """\
        models:
          - name: a
            gguf: m.gguf
            extra_args: ["--rpc", "10.0.0.1:50052", "-hf", "org/model"]
        """,
        [
            (4, "models[0].extra_args[0]: '--rpc' is never allowed: it offloads the model to remote servers"),
            (4, "models[0].extra_args[2]: '-hf' is never allowed: it downloads a model"),
        ],
        id="extra-args-rpc-and-download-always-denied",
    ),
    pytest.param(
        """\
        ollama:
          env:
            OLLAMA_DEBUG: "1"
            LD_PRELOAD: /tmp/evil.so
        """,
        [(4, "ollama.env.LD_PRELOAD: LD_PRELOAD is never allowed: the dynamic loader reads it")],
        id="ollama-env-ld-preload-always-denied",
    ),
    # Under daemon.policy.
    pytest.param(
        """\
        profile: cpu-only
        daemon:
          policy:
            models_root: /usr
        ollama:
          models_dir: /
        models:
          - name: a
            gguf: /etc/shadow
        """,
        [
            (6, "ollama.models_dir: / is outside daemon.policy.models_root /usr"),
            (9, "models[0].gguf: /etc/shadow is outside daemon.policy.models_root /usr"),
        ],
        id="policy-host-files-outside-models-root",
    ),
    pytest.param(
        """\
        profile: cpu-only
        daemon:
          policy: {}
        ollama:
          image: evil/ollama:latest
        models:
          - name: a
            gguf: m.gguf
            image: alpine:3
        """,
        [
            (5, "ollama.image: image 'evil/ollama:latest' is not in daemon.policy.allowed_images"),
            (9, "models[0].image: image 'alpine:3' is not in daemon.policy.allowed_images"),
        ],
        id="policy-foreign-images",
    ),
    pytest.param(
        """\
        profile: cpu-only
        daemon:
          policy:
            allowed_images: [ollama/ollama]
        models:
          - name: a
            gguf: m.gguf
        """,
        [
            (
                4,
                "daemon.policy.allowed_images: profile cpu-only's llamacpp image 'localllm/llama-server:0.3.36-cpu', "
                "which models[0] would run, is not in daemon.policy.allowed_images",
            )
        ],
        id="policy-profile-default-image-not-allowed",
    ),
    pytest.param(
        """\
        daemon:
          policy: {}
        ollama:
          env:
            OLLAMA_KV_CACHE_TYPE: q8_0
            OLLAMA_ORIGINS: "*"
        models:
          - name: a
            gguf: m.gguf
            extra_args: [--threads, "2", --temp, "-0.5", --chat-template-file, /etc/passwd]
        """,
        [
            (6, "ollama.env.OLLAMA_ORIGINS: OLLAMA_ORIGINS is not in daemon.policy.allowed_ollama_env"),
            (10, "models[0].extra_args[4]: '--chat-template-file' is not in daemon.policy.allowed_extra_args"),
        ],
        id="policy-default-allow-lists",
    ),
    pytest.param(
        """\
        daemon:
          policy:
            allowed_images: ["ghcr.io/ggml-org/llama*"]
            models_root: models
            allowed_extra_args: [--threads, --host]
            allowed_ollama_env: [OLLAMA_DEBUG, LD_*]
            colour: blue
        """,
        [
            (3, "daemon.policy.allowed_images: 'ghcr.io/ggml-org/llama*': an image reference, or one ending in"),
            (4, "daemon.policy.models_root: 'models' must be an absolute path"),
            (5, "daemon.policy.allowed_extra_args: '--host' is never allowed: it would expose the server"),
            (6, "daemon.policy.allowed_ollama_env: 'LD_*' is never allowed: the dynamic loader reads it"),
            (7, "daemon.policy.colour: unknown key"),
        ],
        id="policy-itself-invalid",
    ),
    pytest.param(
        """\
        daemon:
          proxy_listen: 0.0.0.0:8081
        """,
        [
            (
                2,
                "daemon.proxy_listen[0]: 0.0.0.0:8081 is not a loopback address, and daemon.api_keys is empty: "
                "anyone who can reach it could use every model. Set daemon.api_keys (each at least 32 characters, "
                "e.g. from `openssl rand -hex 32`), listen on 127.0.0.1, or set daemon.allow_anonymous: true",
            )
        ],
        id="proxy-beyond-loopback-without-keys",
    ),
    pytest.param(
        """\
        daemon:
          proxy_listen:
            - 127.0.0.1:8081
            - "[::]:8082"
            - llm.example.com:8083
        """,
        [
            (4, "daemon.proxy_listen[1]: [::]:8082 is not a loopback address"),
            (5, "daemon.proxy_listen[2]: llm.example.com:8083 is not a loopback address"),
        ],
        id="proxy-listens-beyond-loopback-without-keys",
    ),
    pytest.param(
        """\
        daemon:
          proxy_listen: 0.0.0.0:8081
          api_keys: [sk-local-123456]
        """,
        [(3, "daemon.api_keys[0]: String should have at least 32 characters")],
        id="api-key-too-short",
    ),
    pytest.param(
        """\
        daemon:
          allowed_hosts: ["http://llm.example.com/"]
          proxy_limits:
            header_timeout: 0
            keep_alive: soon
            max_connections: 0
            max_body: 1GiB
            body_budget: 512MiB
          request_fields:
            max_tokens: -1
            drop: [""]
        """,
        [
            (2, "daemon.allowed_hosts[0]: String should match pattern"),
            (4, "daemon.proxy_limits.header_timeout: Input should be greater than 0"),
            (5, "daemon.proxy_limits.keep_alive: 'soon' is not a duration"),
            (6, "daemon.proxy_limits.max_connections: Input should be greater than or equal to 1"),
            (10, "daemon.request_fields.max_tokens: Input should be greater than or equal to 1"),
            (11, "daemon.request_fields.drop[0]: String should have at least 1 character"),
        ],
        id="edge-settings-invalid",
    ),
    pytest.param(
        """\
        daemon:
          proxy_limits:
            max_body: 1GiB
            body_budget: 512MiB
        """,
        [
            (
                {2, 3},
                "daemon.proxy_limits: body_budget (536870912 bytes) is smaller than max_body (1073741824 "
                "bytes): a body of max_body could never be accepted",
            )
        ],
        id="body-budget-below-max-body",
    ),
]


def find_problem(lines_text: list[str], path, lines, fragment: str) -> str | None:
    """The problem line at one of ``lines`` of ``path`` that contains ``fragment``."""
    accepted = lines if isinstance(lines, set) else {lines}
    fragment = fragment.replace("{dir}", str(path.resolve().parent))
    for text in lines_text:
        text = text.strip()
        if any(text.startswith(f"{path}:{line}: ") for line in accepted) and fragment in text:
            return text
    return None
