"""The proxy's request path, fuzzed: every input gets an error object (4xx, in its route's dialect) or is
forwarded, none is the proxy's own 5xx, and the proxy keeps serving (tests/fuzz/harness.py says how each answer
is judged, and which known findings outside intake.py and web_errors.py are counted rather than failed on).

Three parts, each counted in bench/results/fuzz.json:
- the kept corpus (tests/fuzz/corpus), replayed through the real proxy app on a loopback listener;
- hypothesis: requests built from the proxy's routes, headers, API keys and JSON bodies of every shape, with
  the fake model server's answers (streams for the first-chunk rewrite and StreamEnd) drawn too;
- atheris (coverage-guided, libFuzzer) for a fixed number of inputs: ``FUZZ_RUNS``. The long run is
  ``bash scripts/dev.sh fuzz --runs N``.
And the fixes in intake.py, by their inputs: a body nested 100,000 levels deep is a 400, not a 500 (on the
event loop and on a worker thread, parsed or written); a body that is not UTF-8, or says NaN, is a 400; a lone
surrogate escape is written back as one; a large body holds its parsed size of the body budget, and a request
whose client left holds its share until the thread that parses its body is done.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from aiohttp import test_utils, web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loguru import logger

import supervisor.api.intake as intake
from supervisor.api.intake import INLINE_JSON, BodyBudget, Intake, encode_object, parse_object, planned_fields
from supervisor.api.routes import MODEL_ROUTES
from supervisor.api.streams import with_assistant_role
from supervisor.api.web_errors import proxy_error_middleware
from supervisor.config.settings import ProxyLimits, RequestFields
from supervisor.core.errors import BadRequest
from tests.fuzz.harness import KEY, KNOWN, LOCAL_GETS, MAX_BODY, ProxyUnderTest, decode_case, valid_case

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "fuzz" / "corpus"
RESULTS = ROOT / "bench" / "results" / "fuzz.json"
FUZZ_RUNS = 5000  # atheris inputs in the test suite (about 17 s); the corpus's seeds are among them
HYPOTHESIS_EXAMPLES = 600
SENT = Counter()  # inputs sent, by part


def record(section: str, figures: dict) -> None:
    """Write a part's figures into bench/results/fuzz.json (and say them, for the test's output)."""
    try:
        results = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        results = {}
    results[section] = {**figures, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"fuzz {section}: {json.dumps(figures, sort_keys=True)}")


@pytest.fixture(scope="module")
def proxy():
    """The proxy under test, on a loop of its own that each test drives; loguru and aiohttp kept quiet."""
    logger.disable("supervisor")
    aiohttp_logger = logging.getLogger("aiohttp")
    level = aiohttp_logger.level
    aiohttp_logger.setLevel(logging.CRITICAL)
    loop = asyncio.new_event_loop()
    harness = ProxyUnderTest()
    loop.run_until_complete(harness.__aenter__())
    harness.run = loop.run_until_complete
    try:
        yield harness
    finally:
        loop.run_until_complete(harness.__aexit__(None, None, None))
        loop.close()
        aiohttp_logger.setLevel(level)
        logger.enable("supervisor")


# -- the known bug and the other fixes in intake.py, by their inputs -----------------------------------------------


def send(proxy, text: bytes):
    return proxy.run(proxy.check(text))


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/tokenize"])
@pytest.mark.parametrize("depth", [100_000, 300_000])
def test_a_body_nested_100000_levels_deep_is_a_400_with_an_error_object(proxy, path, depth):
    # 100,000 levels: parsed on the event loop; 300,000: above INLINE_JSON, parsed on a worker thread
    text = b'POST %s\nContent-Type: application/json\n@repeat %d\n\n{"model":"a","x":|[|0|]|}' % (
        path.encode(),
        depth,
    )
    assert (len(decode_case(text).body) > INLINE_JSON) == (depth > INLINE_JSON // 2)
    answer = send(proxy, text)
    assert answer.status == 400
    found = answer.json()
    if path == "/v1/messages":
        assert found["type"] == "error" and found["error"]["type"] == "invalid_request_error"
        assert "nested too deeply" in found["error"]["message"]
    else:
        assert found["error"]["code"] == "bad_request" and "nested too deeply" in found["error"]["message"]


def test_a_body_as_deep_as_the_parser_takes_is_refused_when_written_anew_too():
    async def scenario():
        for depth in range(850, 1000, 5):  # at some depth the parse fails: every depth is a payload or a 400
            body = b'{"model":"a","max_tokens":' + b"[" * depth + b"]" * depth + b"}"
            try:
                payload = await parse_object(body)
            except BadRequest as exc:
                assert "nested too deeply" in exc.message
                continue
            with pytest.raises(BadRequest, match="must be an integer \\(got an array\\)"):
                planned_fields(payload, "/v1/chat/completions", RequestFields(), 512)
            deeper = {"x": payload}
            for _ in range(100):
                deeper = {"x": deeper}
            with pytest.raises(BadRequest, match="nested too deeply"):
                await encode_object(deeper, len(body))

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "body, message",
    [
        (b'{"model":"a","s":"\xff"}', "request body is not valid UTF-8: invalid start byte at byte 18"),
        (b'{"model":"a","s":"\xed\xa0\x80"}', "request body is not valid UTF-8"),  # a surrogate, UTF-8-encoded
        ('{"model":"a"}'.encode("utf-16"), "request body is not valid UTF-8"),
        (b'{"model":"a","t":NaN}', "request body is not valid JSON: NaN is not a JSON number"),
        (b'{"model":"a","t":-Infinity}', "request body is not valid JSON: -Infinity is not a JSON number"),
        (b'{"model":"a","n":' + b"1" * 5000 + b"}", "request body is not valid JSON: Exceeds the limit"),
    ],
)
def test_a_body_that_is_not_utf8_json_is_a_bad_request(body, message):
    with pytest.raises(BadRequest, match=re.escape(message)):
        asyncio.run(parse_object(body))


def test_valid_json_that_python_reads_oddly_is_kept():
    async def scenario():
        assert await parse_object(b'\xef\xbb\xbf{"a":1}') == {"a": 1}  # a UTF-8 BOM, as json.loads lets pass
        parsed = await parse_object(b'{"s":"\\ud800","n":1' + b"0" * 400 + b"}")  # a lone surrogate; 10**400
        written = await encode_object(parsed, 10)  # was: a 400 "number JSON cannot carry" (UnicodeEncodeError)
        assert json.loads(written) == parsed and b"\\ud800" in written
        assert (await encode_object({"s": "é"}, 10)) == '{"s":"é"}'.encode()  # UTF-8 as before, not escaped

    asyncio.run(scenario())


def test_a_request_cancelled_during_a_large_parse_keeps_its_budget_until_the_thread_ends(monkeypatch):
    """The parse of a large body goes on on its thread when the client leaves: its share of the body budget
    stays held until the thread has finished (or the budget would admit more bodies than it counts)."""

    async def scenario():
        budget = BodyBudget(10 * MAX_BODY)
        gate = threading.Event()
        real_loads = intake._loads

        def slow_loads(body):
            gate.wait(5)
            return real_loads(body)

        monkeypatch.setattr(intake, "_loads", slow_loads)
        body = b'{"model":"a","pad":"' + b"x" * INLINE_JSON + b'"}'

        async def request():
            with budget.hold(len(body)):
                await parse_object(body)

        task = asyncio.create_task(request())
        await asyncio.sleep(0.05)
        assert budget.used == len(body)
        task.cancel()
        await asyncio.sleep(0.05)
        assert budget.used == len(body) and not task.done()  # cancelled, but the thread still holds the body
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert budget.used == 0

    asyncio.run(scenario())


def test_a_large_body_holds_what_it_takes_parsed_and_one_that_would_take_more_than_the_budget_is_a_413():
    """A body of nothing but ``[],`` takes 20 times its size once parsed: its share of the body budget says so."""
    seen = {}

    async def scenario():
        for budget, body in (
            (16 * 2**20, b"[" + b"[]," * 200_000 + b"[]]"),
            (4 * 2**20, b"[" + b"[]," * 200_000 + b"[]]"),
        ):
            intake_ = Intake(ProxyLimits(max_body=2**20, body_budget=budget))

            async def chat(request):
                async with intake_.body_of(request) as got:
                    seen[budget] = intake_.budget.used
                    return web.json_response({"got": len(got)})

            app = web.Application(middlewares=[proxy_error_middleware])
            app.router.add_post("/v1/chat/completions", chat)
            async with test_utils.TestClient(test_utils.TestServer(app)) as client:
                headers = {"Content-Type": "application/json"}
                async with client.post("/v1/chat/completions", data=body, headers=headers) as response:
                    seen[(budget, "status")] = response.status, await response.json()
            assert intake_.budget.used == 0

    asyncio.run(scenario())
    brackets = 200_002
    assert seen[(16 * 2**20, "status")][0] == 200 and seen[16 * 2**20] == 64 * brackets  # not 600 KB: 12.8 MB
    status, found = seen[(4 * 2**20, "status")]
    assert status == 413 and found["error"]["code"] == "request_too_large"
    assert "JSON arrays and objects" in found["error"]["message"] and 4 * 2**20 not in seen
    assert intake.parsed_size(b"x" * (INLINE_JSON + 1)) == INLINE_JSON + 1  # text: its size
    assert intake.parsed_size(b"[]" * 1000) == 2000  # small: on the loop, whatever it holds


ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=8)  # lone surrogates too
FINITE_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
)


def _utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(payload=st.dictionaries(ANY_TEXT, FINITE_VALUES, max_size=4), ascii_only=st.booleans(), pad=st.booleans())
def test_any_json_object_is_read_and_written_back_as_it_was(payload, ascii_only, pad):
    """What a client may send, parsed and written anew (both on the loop, or both on a thread), is the same JSON."""
    body = json.dumps(payload, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    if pad:
        body += b" " * (INLINE_JSON + 1)
    if not ascii_only and not _utf8_encodable(json.dumps(payload, ensure_ascii=False)):
        with pytest.raises(BadRequest, match="not valid UTF-8"):  # a lone surrogate, UTF-8-encoded: not UTF-8
            asyncio.run(parse_object(body))
        return

    async def scenario():
        parsed = await parse_object(body)
        assert parsed == payload
        assert json.loads(await encode_object(parsed, len(body))) == payload

    asyncio.run(scenario())


CHUNK_VALUES = st.recursive(  # what a model server writes: no lone surrogate, no NaN (not equal to itself)
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    delta=st.dictionaries(st.sampled_from(["content", "role", "reasoning_content", "tool_calls"]), CHUNK_VALUES),
    rest=st.dictionaries(st.text(max_size=6).filter(lambda key: key != "choices"), CHUNK_VALUES, max_size=3),
    spaced=st.booleans(),
)
def test_the_first_chunk_rewrite_adds_the_role_and_keeps_everything_else(delta, rest, spaced):
    """streams.with_assistant_role on any chat chunk it can write back (no lone surrogate, not nested too deeply:
    harness.KNOWN["first-event-rewrite-raises"]): the same chunk, with ``role: assistant`` unless it had one."""
    chunk = {"choices": [{"index": 0, "delta": delta, "finish_reason": None}], **rest}
    event = b"data: " + json.dumps(chunk, separators=None if spaced else (",", ":")).encode() + b"\n\n"
    written = with_assistant_role(event)
    if "role" in delta:
        assert written == event
        return
    assert written.startswith(b"data: {") and written.endswith(b"\n\n") and written.count(b"\n") == 2
    rewritten = json.loads(written[6:])
    assert rewritten["choices"][0]["delta"] == {"role": "assistant", **delta}
    rewritten["choices"][0]["delta"].pop("role")
    assert rewritten == json.loads(json.dumps(chunk))


# -- the kept corpus ------------------------------------------------------------------------------------------------


def test_every_input_of_the_corpus_is_answered_as_it_must_be(proxy):
    seeds = sorted(CORPUS.glob("*.req"))
    assert len(seeds) > 150
    known_before, started = Counter(proxy.known), time.monotonic()
    for seed in seeds:
        send(proxy, seed.read_bytes())
    met = proxy.known - known_before  # the known findings, each with an input of its own in the corpus
    record("corpus", {"inputs": len(seeds), "seconds": round(time.monotonic() - started, 2), "known_findings_met": met})


# -- hypothesis -----------------------------------------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**400)
    | st.floats()
    | st.text(max_size=12)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
)
NAMES = st.sampled_from(["a", "f", "o", "cold", "alias-a"])  # the catalog's (tests/fuzz/harness.py)
MODELS = st.one_of(NAMES, NAMES, NAMES, st.sampled_from(["nope", "", "A", "a ", "tiny:1b", "a\u0000"]), JSON_VALUES)
LENGTHS = st.one_of(st.integers(-(10**6), 10**6), st.sampled_from([-1, 0, 4096, 4097, 10**400, None]), JSON_VALUES)


def chunk(delta) -> str:
    return "data: " + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}) + "\n\n"


SSE_EVENTS = st.one_of(
    st.builds(chunk, st.dictionaries(st.sampled_from(["content", "role", "reasoning_content"]), JSON_VALUES)),
    st.builds(chunk, JSON_VALUES),
    st.sampled_from(
        [
            "data: [DONE]\n\n",
            'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n',
            "event: message_stop\ndata: {}\n\n",
            ": a comment\n\n",
            'data: {"error":{"message":"boom"}}\n\n',
            "data: {",
            "\n\n",
            "\r\n\r\n",
        ]
    ),
    st.text(max_size=40),
)
FAKE_ANSWERS = st.fixed_dictionaries(
    {},
    optional={
        "status": st.sampled_from([200, 201, 204, 400, 404, 413, 429, 500, 502, 503, 529]),
        "events": st.lists(SSE_EVENTS, max_size=6),
        "retry_after": st.sampled_from(["1", "", "abc", "-1", "99999999999999999999", "1.5"]),
        "content_type": st.sampled_from(["application/json", "text/event-stream", "text/plain", ""]),
        "body": st.text(max_size=40),
        "close": st.booleans(),
    },
)
BODIES = st.fixed_dictionaries(
    {"model": MODELS},
    optional={
        "stream": st.booleans() | JSON_VALUES,
        "max_tokens": LENGTHS,
        "n_predict": LENGTHS,
        "max_completion_tokens": LENGTHS,
        "id_slot": JSON_VALUES,
        "cache_prompt": JSON_VALUES,
        "logit_bias": JSON_VALUES,
        "temperature": JSON_VALUES,
        "messages": JSON_VALUES,
        "x_fake": FAKE_ANSWERS | FAKE_ANSWERS,
    },
)
ROUTES = st.sampled_from([route.path for route in MODEL_ROUTES])
ODD_PATHS = st.sampled_from(
    ["/v1/chat/completions/", "/v1%2Fchat%2Fcompletions", "/v1/../v1/messages", "/v1/messages?beta=true",
     "/v1/%6Dessages", "//tokenize", "/nope", "/V1/CHAT/COMPLETIONS", "/v1/chat/completions%00"]
)  # fmt: skip
GETS = st.sampled_from([*LOCAL_GETS, "/v1/models/a", "/v1/models/alias-a", "/v1/models/%2e%2e", "/v1/models/a%2Fb"])
VALID_CONTENT_TYPES = st.sampled_from(
    ["application/json", "application/json; charset=utf-8", "Application/JSON; Charset=UTF-8", 'application/json;charset="utf8"']
)  # fmt: skip
ODD_CONTENT_TYPES = st.sampled_from(
    ["application/json; charset=latin-1", "text/plain", "application/json; x=y", "", "application/jsonx", None]
)
VALID_KEYS = st.sampled_from([f"Authorization: Bearer {KEY}", f"x-api-key: {KEY}", f"Authorization: bearer {KEY}"])
ODD_KEYS = st.sampled_from(
    [None, "x-api-key: nope", f"Authorization: Basic {KEY}", f"Authorization: Bearer {KEY} ", "Authorization: Bearer",
     f"Authorization: Bearer  {KEY}", "x-api-key: é", f"x-api-key: {KEY[:-1]}"]
)  # fmt: skip
ODD_HEADERS = st.sampled_from(
    ["Content-Encoding: gzip", "Expect: 100-continue", "Connection: close", "Transfer-Encoding: gzip", "X-A: é",
     "Accept: text/html", "anthropic-version: 2023-06-01", "Host: localhost"]
)  # fmt: skip


def sometimes(draw, percent: int) -> bool:
    return draw(st.integers(0, 99)) < percent


@st.composite
def requests(draw) -> bytes:
    """A case in harness.py's text (a request line, headers, directives, a blank line, a body): mostly a valid
    request to a model route, with a few of its parts made odd, so that most reach the proxy's deeper paths."""
    if sometimes(draw, 8):  # one of the proxy's own GET routes
        method, path = draw(st.sampled_from(["GET", "GET", "HEAD", "POST"])), draw(GETS)
    else:
        method = "POST" if not sometimes(draw, 5) else draw(st.sampled_from(["GET", "HEAD", "PUT", "OPTIONS"]))
        path = draw(ROUTES) if not sometimes(draw, 8) else draw(ODD_PATHS)
    lines = [f"{method} {path}"]
    content_type = draw(VALID_CONTENT_TYPES) if not sometimes(draw, 10) else draw(ODD_CONTENT_TYPES)
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if sometimes(draw, 40):
        lines.append("@locked")
        key = draw(VALID_KEYS) if not sometimes(draw, 20) else draw(ODD_KEYS)
        if key:
            lines.append(key)
    if sometimes(draw, 5):
        lines.append("@chunked")
    if sometimes(draw, 10):
        lines.append(draw(ODD_HEADERS))
    kind = draw(st.integers(0, 99))
    if kind < 4:  # nested deeper than any parser takes, or about as deep as it takes
        lines.append(f"@repeat {draw(st.sampled_from([900, 1000, 100_000, 200_000]))}")
        body = draw(st.sampled_from(['{"model":"a","x":|[|0|]|}', '{"model":"a","x":|{"k":|0|}|}', "|[|]|"]))
        return ("\n".join(lines) + "\n\n" + body).encode()
    if kind < 8:  # at the size limit, or one byte over
        lines.append(f"@size {draw(st.sampled_from([-1, 0, 1]))}")
    if kind < 8 or kind >= 12:
        payload = draw(BODIES)
        body = json.dumps(payload, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    else:  # not JSON, or not UTF-8
        body = draw(st.binary(max_size=60))
    return ("\n".join(lines) + "\n\n").encode() + body


@settings(
    max_examples=HYPOTHESIS_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=requests())
def test_any_request_is_answered_with_an_error_object_or_forwarded_and_the_proxy_keeps_serving(proxy, case):
    SENT["hypothesis"] += 1
    send(proxy, case)


def test_hypothesis_count(proxy):
    """Runs after the property test: the inputs it sent, in bench/results/fuzz.json."""
    record("hypothesis", {"inputs": SENT["hypothesis"], "max_examples": HYPOTHESIS_EXAMPLES})
    assert send(proxy, valid_case()).status == 200
    assert send(proxy, valid_case(locked=True)).status == 200


# -- atheris --------------------------------------------------------------------------------------------------------


def test_atheris_finds_nothing_new_in_a_fixed_number_of_inputs(tmp_path):
    try:  # never skipped: pyproject's test extra installs it wherever it has wheels (Linux x86_64, CPython < 3.14)
        import atheris  # noqa: F401
    except ImportError:
        pytest.fail("atheris is not installed: run bash scripts/dev.sh setup (it is in the test extra and the lock)")
    stats, new, findings = tmp_path / "stats.json", tmp_path / "new", tmp_path / "findings"
    new.mkdir()
    findings.mkdir()
    command = [
        sys.executable,
        "-m",
        "tests.fuzz.proxy_fuzz",
        f"-runs={FUZZ_RUNS}",
        "-seed=1",
        "-max_total_time=120",
        f"-dict={ROOT / 'tests' / 'fuzz' / 'proxy.dict'}",
        f"-artifact_prefix={findings}/",
        str(new),
        str(CORPUS),
    ]
    state = Path(tempfile.mkdtemp(prefix="lf-", dir="/tmp"))  # the fleet's sockets: pytest's paths are too long
    env = {**os.environ, "LOCALLLM_FUZZ_STATS": str(stats), "LOCALLLM_FUZZ_TMP": str(state)}
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(state, ignore_errors=True)  # libFuzzer ends the process with exit(): no cleanup of its own
    seconds = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"atheris found something (input kept in {findings}):\n{output[-6000:]}"
    ran = re.search(r"Done (\d+) runs in (\d+) second", output)
    assert ran is not None, output[-3000:]
    figures = json.loads(stats.read_text())
    assert int(ran.group(1)) == FUZZ_RUNS and figures["cases"] >= FUZZ_RUNS
    coverage = re.findall(r"cov: (\d+)", output)
    record(
        "atheris",
        {
            "inputs": int(ran.group(1)),
            "seconds": round(seconds, 1),
            "branches_covered": int(coverage[-1]) if coverage else None,
            "known_findings_met": figures["known"],
            "known_findings": sorted(KNOWN),
        },
    )
