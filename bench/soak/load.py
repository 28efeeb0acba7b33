"""The soak's steady load: a few client threads, each a loop of requests with a seeded random generator.

Every request ends in exactly one outcome:

    ok                     200 with a whole answer, or a stream that said how it ended ([DONE] or a finish_reason)
    error_response         an HTTP error answer (4xx, 5xx), as the proxy documents them
    stream_error_event     a stream that ended with an error event (``data: {"error": ...}``)
    client_disconnect      this client closed the stream early, on purpose
    daemon_down            a connection refused or broken while localllmd was killed (-9) and restarting
    transport_error        a connection refused or broken while localllmd was up: a violation
    hang                   no answer within the client's timeouts (no byte for READ_TIMEOUT, or longer than
                           TOTAL_TIMEOUT in all): a violation
    silent_truncation      a stream that ended cleanly without [DONE], a finish_reason or an error event:
                           a violation
    bad_answer             a 200 whose body is not a whole answer: a violation
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass

import requests

CONNECT_TIMEOUT = 5.0
# No byte for this long is a hang. A request may wait for its model up to the daemon's queue_timeout (30 s) and
# a start up to startup_timeout (30 s); a waiting stream gets a keep-alive comment every 5 s.
READ_TIMEOUT = 75.0
TOTAL_TIMEOUT = 120.0
VIOLATING = ("transport_error", "hang", "silent_truncation", "bad_answer")
OUTCOMES = (
    "ok",
    "error_response",
    "stream_error_event",
    "client_disconnect",
    "daemon_down",
    *VIOLATING,
)
# request kinds, with their weights
KINDS = {"chat": 3, "chat_stream": 4, "completion": 1, "chat_stream_disconnect": 2}


@dataclass
class Record:
    client: int
    kind: str
    model: str
    started: float  # seconds since the soak's start
    ended: float
    outcome: str
    status: int | None = None
    detail: str = ""


def chat_body(model: str, stream: bool, max_tokens: int) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "count to ten"}]}
    if stream:
        body.update(stream=True, ignore_eos=True)
    return body


def send(url: str, kind: str, model: str, rng: random.Random, clock) -> tuple[str, int | None, str]:
    """One request of ``kind``; returns (outcome, HTTP status, detail). Transport errors come back as
    ``transport_error``: the caller tells those of a killed daemon apart afterwards."""
    started = clock()
    stream = kind.startswith("chat_stream")
    if kind == "completion":
        path, body = "/completions", {"model": model, "prompt": "hello", "max_tokens": rng.randint(1, 8)}
    else:
        path, body = "/chat/completions", chat_body(model, stream, rng.randint(8, 48) if stream else rng.randint(1, 8))
    disconnect_after = rng.randint(1, 3) if kind == "chat_stream_disconnect" else 0
    try:
        with requests.post(
            url + path,
            json=body,
            stream=stream,
            timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
            headers={"Connection": "close"},
        ) as response:
            if response.status_code != 200:
                text = response.text
                try:
                    code = response.json()["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    return "error_response", response.status_code, f"not a JSON error: {text[:120]!r}"
                return "error_response", response.status_code, code
            if not stream:
                try:
                    answer = response.json()
                    assert answer["choices"], "no choices"
                except (ValueError, KeyError, TypeError, AssertionError) as exc:
                    return "bad_answer", 200, f"{exc}: {response.text[:200]!r}"
                if clock() - started > TOTAL_TIMEOUT:
                    return "hang", 200, f"answered after {clock() - started:.1f}s"
                return "ok", 200, ""
            return read_stream(response, disconnect_after, started, clock)
    except requests.exceptions.ConnectTimeout as exc:
        return "hang", None, f"connect timeout: {exc.__class__.__name__}"
    except requests.exceptions.ReadTimeout:
        return "hang", None, f"no byte for {READ_TIMEOUT:g}s"
    except requests.exceptions.RequestException as exc:
        return "transport_error", None, f"{exc.__class__.__name__}: {str(exc)[:160]}"


def read_stream(response: requests.Response, disconnect_after: int, started: float, clock) -> tuple[str, int, str]:
    data_lines = 0
    done = finished = False
    error = None
    for line in response.iter_lines(chunk_size=None):
        if clock() - started > TOTAL_TIMEOUT:
            return "hang", 200, f"stream still open after {TOTAL_TIMEOUT:g}s"
        if not line.startswith(b"data: "):
            continue  # blank separators and ": localllm: ..." keep-alive comments
        payload = line[6:].strip()
        data_lines += 1
        if payload == b"[DONE]":
            done = True
            continue
        try:
            event = json.loads(payload)
        except ValueError:
            return "bad_answer", 200, f"a data line that is not JSON: {payload[:120]!r}"
        if not isinstance(event, dict):
            return "bad_answer", 200, f"a data line that is not a JSON object: {payload[:120]!r}"
        if "error" in event:
            error = event["error"]
        for choice in event.get("choices") or []:
            if isinstance(choice, dict) and choice.get("finish_reason"):
                finished = True
        if disconnect_after and data_lines >= disconnect_after and error is None and not (done or finished):
            return "client_disconnect", 200, f"closed after {data_lines} event(s)"
    if error is not None:
        code = error.get("code") if isinstance(error, dict) else error
        return "stream_error_event", 200, str(code)
    if done or finished:
        return "ok", 200, ""
    return "silent_truncation", 200, f"ended cleanly after {data_lines} data line(s), without [DONE] or an error"


class Load:
    """``clients`` threads sending requests until ``stop()``, each with its own seeded generator."""

    def __init__(self, url: str, models: list[tuple[str, float]], seed: int, clock, clients: int = 4):
        self.url = url
        self.models = models
        self.seed = seed
        self.clock = clock
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(n,), name=f"soak-client-{n}", daemon=True)
            for n in range(clients)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = TOTAL_TIMEOUT + 10) -> list[str]:
        """Stop the clients; returns the names of those that did not finish (each is a hang of its own)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in self._threads if t.is_alive()]

    def _client(self, number: int) -> None:
        rng = random.Random(f"{self.seed}-client-{number}")
        names, weights = [m for m, _ in self.models], [w for _, w in self.models]
        kinds, kind_weights = list(KINDS), list(KINDS.values())
        while not self._stop.is_set():
            model = rng.choices(names, weights)[0]
            kind = rng.choices(kinds, kind_weights)[0]
            started = self.clock()
            outcome, status, detail = send(self.url, kind, model, rng, self.clock)
            self.add(Record(number, kind, model, round(started, 3), round(self.clock(), 3), outcome, status, detail))
            self._stop.wait(rng.uniform(0.05, 0.4))

    def add(self, record: Record) -> None:
        with self._lock:
            self.records.append(record)

    def snapshot(self) -> list[Record]:
        with self._lock:
            return list(self.records)


def explain(records: list[Record], down: list[tuple[float, float]]) -> None:
    """Transport errors of requests that overlapped a window when the daemon was down are ``daemon_down``."""
    for record in records:
        if record.outcome == "transport_error" and any(
            record.started <= end and record.ended >= start for start, end in down
        ):
            record.outcome = "daemon_down"


def tally(records: list[Record]) -> dict:
    by_outcome = Counter(r.outcome for r in records)
    by_kind: dict[str, Counter] = {}
    by_model: dict[str, Counter] = {}
    for r in records:
        by_kind.setdefault(r.kind, Counter())[r.outcome] += 1
        by_model.setdefault(r.model, Counter())[r.outcome] += 1
    errors = Counter(f"{r.status} {r.detail}" for r in records if r.outcome == "error_response")
    events = Counter(r.detail for r in records if r.outcome == "stream_error_event")
    return {
        "total": len(records),
        "by_outcome": {o: by_outcome.get(o, 0) for o in OUTCOMES},
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "by_model": {k: dict(v) for k, v in sorted(by_model.items())},
        "error_responses": dict(errors.most_common()),
        "stream_error_events": dict(events.most_common()),
        "violating": [asdict(r) for r in records if r.outcome in VIOLATING],
    }


def probe(url: str, model: str) -> tuple[bool, str]:
    """One small non-streaming chat: did ``model`` answer?"""
    try:
        with requests.post(
            url + "/chat/completions",
            json=chat_body(model, False, 1),
            timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
            headers={"Connection": "close"},
        ) as response:
            if response.status_code == 200:
                return True, "200"
            try:
                return False, f"{response.status_code} {response.json()['error']['code']}"
            except (ValueError, KeyError, TypeError):
                return False, f"{response.status_code}"
    except requests.exceptions.RequestException as exc:
        return False, exc.__class__.__name__
