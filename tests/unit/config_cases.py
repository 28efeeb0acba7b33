"""Bad config files and the problems they must produce, shared by load_config and CLI tests.

Each case: YAML text (dedented; ``m.gguf`` exists beside it) and the expected
problems as (line or set of acceptable lines, text the problem must contain).
``{dir}`` in the text stands for the config file's directory.
"""

from __future__ import annotations

import pytest

KNOWN = "known: auto, cpu-only, gpu-1x24g, gpu-1x80g, gpu-1x8g, gpu-2x24g"

BAD_CONFIGS = [
    pytest.param("""\
        models:
          - name: a
            gguf: m.gguf
            context_size: 4096: 8192
        """, [(4, "YAML syntax error: mapping values are not allowed here")], id="yaml-syntax-mapping"),
    pytest.param("profile: cpu-only\nmodels:\n\t- name: a\n",
                 [(3, "YAML syntax error: found character '\\t' that cannot start any token")], id="yaml-syntax-tab"),
    pytest.param("- a\n", [(1, "expected a mapping at the top level")], id="top-level-list"),
    pytest.param("""\
        profile: cpu-only
        colour: blue
        models: []
        """, [(2, "colour: unknown key")], id="unknown-top-level-key"),
    pytest.param("""\
        models:
          - name: a
            gguf: m.gguf
            temperature: 0.7
        """, [(4, "models[0].temperature: unknown key")], id="unknown-model-key"),
    pytest.param("""\
        daemon:
          instance: test
          listen: 127.0.0.1:9000
        """, [(3, "daemon.listen: unknown key")], id="unknown-daemon-key"),
    pytest.param("""\
        models:
          - name: a
            gguf: m.gguf
            sampling:
              temperature: 0.7
        """, [(4, "models[0].sampling: unknown key")], id="unknown-key-with-block-value"),
    pytest.param("""\
        models:
          - name: a
            gguf: m.gguf
            context_size: "big"
        """, [(4, "models[0].context_size: Input should be a valid integer, unable to parse string as an integer (got 'big')")],
        id="context-size-string"),
    pytest.param("""\
        models:
          - name: a
            gguf: m.gguf
            context_size: 64
        """, [(4, "models[0].context_size: Input should be greater than or equal to 128")], id="context-size-too-small"),
    pytest.param("""\
        models:
          - name: a
            gguf: m.gguf
            preload: [1]
        """, [(4, "models[0].preload: Input should be a valid boolean (got [1])")], id="preload-list"),
    pytest.param("""\
        models:
          - name: a
            gguf: m.gguf
            ttl: abc
        """, [(4, "models[0].ttl: 'abc' is not a duration (examples: 30, 30s, 5m, 1h, 250ms)")], id="ttl-not-duration"),
    pytest.param("""\
        models:
          - name: a
            gguf: m.gguf
            ttl: true
        """, [(4, "models[0].ttl: ")], id="ttl-boolean"),
    pytest.param("""\
        daemon:
          proxy_listen: localhost
        """, [(2, "daemon.proxy_listen: 'localhost' is not HOST:PORT")], id="listen-without-port"),
    pytest.param("""\
        models:
          - name: a
            gguf: m.gguf
          - name: a
            gguf: m.gguf
        """, [(4, "models[1].name: duplicate model name 'a' (also models[0])")], id="duplicate-name"),
    pytest.param("""\
        models:
          - name: a
            aliases: [b]
            gguf: m.gguf
          - name: b
            gguf: m.gguf
        """, [(5, "models[1].name: duplicate model name 'b' (also models[0])")], id="name-clashes-with-alias"),
    pytest.param("""\
        models:
          - name: a
            gguf: m.gguf
          - name: c
            aliases:
              - x
              - a
            gguf: m.gguf
        """, [(7, "models[1].aliases[1]: duplicate model name 'a' (also models[0])")], id="alias-clashes-with-name"),
    pytest.param("""\
        models:
          - name: a
            gguf: m.gguf
          - name: b
            gguf: models/nope.gguf
        """, [(5, "models[1].gguf: model file {dir}/models/nope.gguf does not exist")], id="missing-model-file"),
    pytest.param("""\
        models:
          - name: a
            gguf: .
        """, [(3, "models[0].gguf: model file {dir} is not a file")], id="model-file-is-directory"),
    pytest.param("""\
        daemon:
          instance: test
          proxy_listen: 127.0.0.1:28150
          port_range: 28100-28199
        """, [({1, 4}, "port_range 28100-28199 clashes with proxy_listen 127.0.0.1:28150")], id="port-range-clash"),
    pytest.param("""\
        daemon:
          control_listen: 127.0.0.1:28160
          control_token: 0123456789abcdef
          port_range: 28100-28199
        """, [({1, 4}, "port_range 28100-28199 clashes with control_listen 127.0.0.1:28160")],
        id="control-listen-in-port-range"),
    pytest.param("""\
        daemon:
          proxy_listen: 127.0.0.1:8081
          control_listen: 127.0.0.1:8081
          control_token: 0123456789abcdef
        """, [(3, "control_listen 127.0.0.1:8081 uses a proxy_listen port")], id="control-listen-on-proxy-port"),
    pytest.param("""\
        daemon:
          control_listen: 127.0.0.1:8090
        """, [(1, "daemon: control_listen needs control_token")], id="control-listen-without-token"),
    pytest.param("""\
        daemon:
          control_listen: 127.0.0.1:8090
          control_token: short
        """, [(3, "daemon.control_token: String should have at least 16 characters")], id="control-token-too-short"),
    pytest.param("""\
        daemon:
          port_range: 30000-29000
        """, [(2, "daemon.port_range: port range 30000-29000 must satisfy 1024 <= low <= high <= 65535")],
        id="port-range-low-above-high"),
    pytest.param("""\
        daemon:
          port_range: [30000, 29000]
        """, [(2, "daemon.port_range: port range 30000-29000 must satisfy 1024 <= low <= high <= 65535")],
        id="port-range-list-low-above-high"),
    pytest.param("""\
        profile: cpu-only
        models: []
        profile: gpu-1x8g
        """, [(3, "duplicate key 'profile' (first at line 1)")], id="duplicate-top-level-key"),
    pytest.param("""\
        models:
          - name: a
            gguf: m.gguf
            gguf: other.gguf
        """, [(4, "duplicate key 'gguf' (first at line 3)")], id="duplicate-model-key"),
    pytest.param("""\
        models: []
        profile: gpu-9x9g
        """, [(2, f"profile: unknown profile 'gpu-9x9g' ({KNOWN})")], id="unknown-profile"),
    pytest.param("""\
        profile: gpu-9x9g
        models:
          - name: a
            gguf: m.gguf
          - name: a
            gguf: gone.gguf
        """, [(5, "models[1].name: duplicate model name 'a' (also models[0])"),
              (6, "models[1].gguf: model file {dir}/gone.gguf does not exist"),
              (1, "profile: unknown profile 'gpu-9x9g'")], id="every-cross-check-problem-reported"),
    pytest.param("""\
        models:
          - name: a
            gguf: m.gguf
            extra_args: ["--threads", "8", "--ctx-size=65536"]
        """, [(4, "models[0].extra_args: '--ctx-size' is set by localllm, which sizes the model's memory by it; "
                  "set context_size instead")], id="extra-args-override-a-pinned-flag"),
    pytest.param("""\
        models:
          - name: a
            gguf: m.gguf
            extra_args: ["-ngl", "10"]
        """, [(4, "models[0].extra_args: '-ngl' is set by localllm, which sizes the model's memory by it; "
                  "set gpu_layers instead")], id="extra-args-short-pinned-flag"),
    pytest.param("""\
        models:
          - name: a
            gguf: m.gguf
            flash_attention: false
            cache_type_v: q8_0
        """, [({2, 3}, "models[0]: cache_type_v: q8_0 needs flash_attention: true (llama.cpp refuses a quantized V "
                       "cache without flash attention)")], id="quantized-v-cache-without-flash-attention"),
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
