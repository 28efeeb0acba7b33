"""What a LibreChat setup sends: API keys on the proxy, the ping from the original plan, and a chat streamed
through LibreChat's own client stack (librechat_stack/: @langchain/openai over the openai SDK, on Node) while
its model loads."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from .base_image import cache_dir

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


STACK = Path(__file__).parent / "librechat_stack"
STACK_PINS = ("package.json", "package-lock.json", ".npmrc")  # what the installed node_modules depend on
NODE_MAJOR = 20  # the pinned packages' "engines"


@pytest.fixture(scope="session")
def librechat_stack() -> Path:
    """LibreChat's client stack, installed once (``npm ci`` from the committed lockfile) into
    ``${LOCALLLM_CACHE:-~/.cache/localllm}/librechat-stack-<hash of the pins>``, with stream_chat.mjs next to it."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: the LibreChat client test runs @langchain/openai on Node.js "
            "(`bash scripts/dev.sh setup` installs the Debian packages nodejs and npm)"
        )
    version = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < NODE_MAJOR:
        pytest.fail(f"node {version} is too old: the pinned @langchain packages need Node.js {NODE_MAJOR} or newer")
    digest = hashlib.sha256(b"".join((STACK / name).read_bytes() for name in STACK_PINS)).hexdigest()[:12]
    target = cache_dir() / f"librechat-stack-{digest}"
    if not target.is_dir():  # installed in a scratch folder and renamed, so a half-done install is never used
        scratch = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        for name in STACK_PINS:
            shutil.copy(STACK / name, scratch / name)
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=scratch, capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:
            pytest.fail(f"npm ci failed ({done.returncode}) in {scratch}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        try:
            scratch.rename(target)
        except OSError:  # another session installed it meanwhile
            shutil.rmtree(scratch, ignore_errors=True)
    script = target / "stream_chat.mjs"  # next to node_modules, where Node resolves its imports
    staged = target / f"stream_chat.{os.getpid()}.tmp"
    shutil.copy(STACK / "stream_chat.mjs", staged)
    staged.replace(script)
    return target


def stream_with_langchain(stack: Path, base_url: str, model: str) -> list[dict]:
    """One streamed chat through ChatOpenAI, as LibreChat sends it: the chunks LangChain yielded, then the aggregate."""
    done = subprocess.run(
        ["node", str(stack / "stream_chat.mjs"), base_url, model, "8"],
        cwd=stack,
        capture_output=True,
        text=True,
        timeout=180,
    )
    report = f"node exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0 and not done.stderr, report  # LangChain warns on stderr (chunks it cannot merge)
    lines = [json.loads(line) for line in done.stdout.splitlines()]  # console.log warnings would not parse
    assert lines and lines[-1]["type"] == "final" and all(line["type"] == "chunk" for line in lines[:-1]), report
    return lines


def shown(lines: list[dict]) -> str:
    return "\n" + "\n".join(json.dumps(line, ensure_ascii=False) for line in lines)


# "loading slow…", a "still loading" note every 5 s, then "slow is ready (N s).", each with its progress
LOADING_NOTES = re.compile(
    r"loading slow( on \S+)?…(\nstill loading slow( on \S+)? \(\d+ s[^)]*\)…)*\nslow is ready \(\d+ s[^)]*\)\.\n\n"
)


@pytest.mark.parametrize(
    ("daemon_settings", "model_settings", "notes"),
    [
        ({"loading_progress": "reasoning"}, {}, True),
        ({}, {"loading_progress": "reasoning"}, True),  # the model's own setting, over the daemon's default
        ({}, {}, False),  # the default, comments: nothing a client shows
    ],
    ids=["daemon-reasoning", "model-reasoning", "default-comments"],
)
def test_librechat_client_stack_streams_a_chat_to_a_model_that_must_load_first(
    start_daemon, librechat_stack, daemon_settings, model_settings, notes
):
    daemon = start_daemon([{"name": "slow", "gguf": "slow.gguf", **model_settings}], **daemon_settings)
    assert daemon.model("slow")["state"] != "ready"

    cold = stream_with_langchain(librechat_stack, daemon.proxy_url, "slow")
    *chunks, final = cold
    seen = shown(cold)
    assert daemon.model("slow")["state"] == "ready"
    assert all(chunk["message"] == "ai" for chunk in chunks), seen  # every delta read as the assistant's
    noted = [chunk for chunk in chunks if chunk["reasoning"] is not None]
    if notes:  # the notes come first, each as reasoning only; the model's own stream follows them
        assert noted and chunks[: len(noted)] == noted and all(chunk["content"] == "" for chunk in noted), seen
        assert LOADING_NOTES.fullmatch(final["reasoning"]), seen
    else:
        assert not noted and final["reasoning"] is None, seen
    answer = chunks[len(noted) :]
    [finish] = [chunk["finish_reason"] for chunk in answer if chunk["finish_reason"] is not None]
    assert finish in ("length", "stop") and final["finish_reason"] == finish, seen
    assert final["content"] and final["content"] == "".join(chunk["content"] for chunk in answer), seen
    assert final["model_name"] == "slow" and final["usage"]["output_tokens"] > 0, seen  # the model's own usage

    # Warm, the same chat is answered at once, with no notes: the answer after the notes was the model's own.
    warm = stream_with_langchain(librechat_stack, daemon.proxy_url, "slow")
    assert all(line["reasoning"] is None for line in warm), shown(warm)
    assert (warm[-1]["content"], warm[-1]["finish_reason"]) == (final["content"], final["finish_reason"]), shown(warm)
