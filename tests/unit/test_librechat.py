"""The LibreChat block: what LibreChat 0.8.7 needs to use the proxy well."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from supervisor.cli.librechat import librechat_block
from supervisor.config.settings import Config
from supervisor.core.errors import BadRequest

KEY = "sk-local-0123456789abcdef0123456789abcdef"  # daemon.api_keys need 32 characters or more


def config(**daemon) -> Config:
    return Config.model_validate(
        {"daemon": daemon, "models": [{"name": "llama3", "gguf": "/m/a.gguf"}, {"name": "qwen", "gguf": "/m/b.gguf"}]}
    )


def test_the_block_points_librechat_at_the_proxy_with_the_settings_it_needs():
    [endpoint] = librechat_block(
        config(proxy_listen="0.0.0.0:8081", api_keys=[KEY]), "localllm", "host.docker.internal"
    )["endpoints"]["custom"]
    assert endpoint == {
        "name": "localllm",
        "apiKey": KEY,
        "baseURL": "http://host.docker.internal:8081/v1",
        "models": {"default": ["llama3", "qwen"], "fetch": True},
        "titleConvo": True,
        "titleModel": "current_model",
        "modelDisplayLabel": "localllm",
    }


def test_without_keys_the_api_key_is_a_placeholder():
    [endpoint] = librechat_block(config(), "local", "172.17.0.1")["endpoints"]["custom"]
    assert endpoint["apiKey"] == "no-key" and endpoint["baseURL"] == "http://172.17.0.1:8081/v1"


@pytest.mark.parametrize("name", ["ollama", "Ollama-local"])
def test_a_name_starting_with_ollama_is_refused(name):
    with pytest.raises(BadRequest, match="starts with 'ollama'"):
        librechat_block(config(), name, "host.docker.internal")


def test_the_cli_prints_yaml_that_parses(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        f"daemon: {{proxy_listen: '0.0.0.0:9000', api_keys: [{KEY}]}}\nmodels:\n  - {{name: m, gguf: x.gguf}}\n"
    )
    done = subprocess.run(
        [str(Path(sys.executable).parent / "localllmctl"), "--config", str(path), "librechat"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["endpoints"]["custom"][0]["baseURL"] == "http://host.docker.internal:9000/v1"
    refused = subprocess.run(
        [str(Path(sys.executable).parent / "localllmctl"), "--config", str(path), "librechat", "--name", "ollama"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2 and "starts with 'ollama'" in refused.stderr
