"""What a LibreChat setup sends: API keys on the proxy, and the ping from the original plan."""

from __future__ import annotations

import json
import subprocess

import requests

PING = (
    "wget --header='Content-Type: application/json' --header='Authorization: Bearer no-key' "
    '--post-data=\'{"model":"Llama-xLAM-2-8B-fc-r-Q8_0.gguf","messages":[{"role":"user",'
    '"content":"ping"}]}\' -qO- http://127.0.0.1:8081/v1/chat/completions'
)
FIRST, SECOND = "sk-local-first-0123456789abcdef0123456789", "sk-local-second-0123456789abcdef012345678"


def test_the_ping_from_the_original_plan_is_answered_on_port_8081(start_daemon):
    start_daemon([{"name": "Llama-xLAM-2-8B-fc-r-Q8_0.gguf", "gguf": "tiny.gguf"}], proxy_listen="127.0.0.1:8081")
    done = subprocess.run(PING, shell=True, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["object"] == "chat.completion" and answer["model"] == "Llama-xLAM-2-8B-fc-r-Q8_0.gguf"
    assert isinstance(answer["choices"][0]["message"]["content"], str)


def test_with_api_keys_set_a_wrong_or_missing_key_gets_401(start_daemon):
    daemon = start_daemon([{"name": "tiny", "gguf": "tiny.gguf", "preload": True}], api_keys=[FIRST, SECOND])
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    url = f"{daemon.proxy_url}/chat/completions"
    for headers in ({}, {"Authorization": "Bearer wrong-key-123"}, {"Authorization": f"Basic {FIRST}"}):
        refused = requests.post(url, json=body, headers=headers, timeout=30)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(f"{daemon.proxy_url}/models", timeout=30).status_code == 401
    for key in (FIRST, SECOND):
        assert requests.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60).status_code == 200
