"""Coverage-guided fuzzing of the proxy's request path: atheris (libFuzzer) over ``harness.ProxyUnderTest``.

Each input is a case as harness.py writes them (a request line, headers, ``@`` directives, a blank line, a
body); libFuzzer mutates them, guided by the branches they reach in ``supervisor`` (and in the harness's
fake model server, so that its answers are explored too). A finding raises ``harness.Finding``: libFuzzer
stops, prints the case and what happened, and writes the input as ``crash-<sha1>`` under ``-artifact_prefix``.

    python -m tests.fuzz.proxy_fuzz -runs=3000 -seed=1 NEW_DIR tests/fuzz/corpus    # a fixed number of inputs
    bash scripts/dev.sh fuzz --runs 200000                                            # a long run (see there)

libFuzzer writes the inputs that reached new branches into the first corpus directory only: give it a scratch
one first, and the kept corpus (tests/fuzz/corpus) after it. ``LOCALLLM_FUZZ_STATS``: a file where the cases
run and the known findings met (harness.KNOWN) are written after every case (libFuzzer ends the process with
``exit()``, past any Python ``atexit``). ``LOCALLLM_FUZZ_TMP``: where the fleet's state directory goes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import tempfile
import time

import atheris

with atheris.instrument_imports(include=["supervisor", "tests.fuzz.harness"]):
    from loguru import logger

    from tests.fuzz.harness import ProxyUnderTest


def main() -> None:
    logger.remove()  # the proxy logs each refusal and upstream failure: thousands of lines, none needed here
    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)
    stats_path = os.environ.get("LOCALLLM_FUZZ_STATS")
    tempfile.tempdir = os.environ.get("LOCALLLM_FUZZ_TMP") or None
    loop = asyncio.new_event_loop()
    proxy = ProxyUnderTest()
    loop.run_until_complete(proxy.__aenter__())
    started = time.monotonic()

    def one(data: bytes) -> None:
        loop.run_until_complete(proxy.check(data))
        if stats_path:
            stats = {"cases": proxy.cases, "seconds": round(time.monotonic() - started, 2), "known": proxy.known}
            with open(stats_path + ".new", "w") as out:
                json.dump(stats, out)
            os.replace(stats_path + ".new", stats_path)

    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
