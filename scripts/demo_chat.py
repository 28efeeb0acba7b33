"""The demo's client: wait for localllmd, then ask one question through the proxy with the openai SDK."""

import argparse
import json
import subprocess
import sys
import time

from openai import OpenAI


def wait_ready(socket: str, deadline: float = 90.0) -> None:
    started = time.monotonic()
    while time.monotonic() - started < deadline:
        done = subprocess.run(["localllmctl", "--socket", socket, "status", "--json"], capture_output=True, text=True)
        if done.returncode == 0:
            states = {m["name"]: m["state"] for m in json.loads(done.stdout)["models"]}
            if all(state == "ready" for state in states.values()):
                return
            if "failed" in states.values():
                sys.exit(f"demo: a model failed to start:\n{done.stdout}")
        time.sleep(0.2)
    sys.exit("demo: localllmd did not become ready in time")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--base-url", default="http://127.0.0.1:8081/v1")
    args = parser.parse_args()
    wait_ready(args.socket)
    client = OpenAI(base_url=args.base_url, api_key="unused")
    print("models:", [m.id for m in client.models.list().data])
    reply = client.chat.completions.create(
        model="demo-tiny", max_tokens=16, messages=[{"role": "user", "content": "Say hello."}]
    )
    print(f"chat answer (random weights, so noise): {reply.choices[0].message.content!r}")
    print(f"usage: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens")


if __name__ == "__main__":
    main()
