"""The proxy's route table, its dialects and the per-model filters: pure pieces, no server."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from supervisor.api.dialects import error_body, error_event, upstream_error
from supervisor.api.routes import MODEL_ROUTES, Dialect, check_served, dialect_of
from supervisor.api.streams import StreamEnd
from supervisor.config.serving import Filters
from supervisor.core.errors import RouteNotServed

OPENAI_ERROR = {
    "error": {"message": "no such model", "type": "invalid_request_error", "param": None, "code": "model_not_found"}
}


def test_every_route_is_once_in_the_table_and_the_messages_routes_speak_anthropic():
    paths = [route.path for route in MODEL_ROUTES]
    assert len(paths) == len(set(paths))
    assert {p for p in paths if dialect_of(p) is Dialect.ANTHROPIC} == {"/v1/messages", "/v1/messages/count_tokens"}
    assert dialect_of("/v1/unknown") is Dialect.OPENAI


@pytest.mark.parametrize(
    "path, backend, served",
    [
        ("/v1/chat/completions", "ollama", True),
        ("/v1/messages", "ollama", True),
        ("/v1/responses", "ollama", True),
        ("/infill", "ollama", False),
        ("/v1/messages/count_tokens", "ollama", False),
        ("/infill", "llamacpp", True),
    ],
)
def test_a_route_the_backend_does_not_serve_is_refused_naming_the_backend(path, backend, served):
    route = next(r for r in MODEL_ROUTES if r.path == path)
    if served:
        check_served(route, "m", backend)
        return
    with pytest.raises(RouteNotServed) as caught:
        check_served(route, "m", backend)
    assert caught.value.http_status == 400 and path in caught.value.message and backend in caught.value.message


@pytest.mark.parametrize(
    "status, kind",
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (404, "not_found_error"),
        (429, "rate_limit_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
    ],
)
def test_anthropic_errors_carry_the_type_its_sdk_knows_for_the_status(status, kind):
    body = error_body(Dialect.ANTHROPIC, OPENAI_ERROR, status)
    assert body == {"type": "error", "error": {"type": kind, "message": "no such model"}}
    assert error_body(Dialect.OPENAI, OPENAI_ERROR, status) is OPENAI_ERROR


def test_stream_error_events_in_each_dialect():
    assert error_event(Dialect.OPENAI, OPENAI_ERROR, 502).startswith(b'data: {"error": ')
    event = error_event(Dialect.ANTHROPIC, OPENAI_ERROR, 502)
    assert event.startswith(b"event: error\ndata: ") and event.endswith(b"\n\n")
    assert json.loads(event.split(b"data: ", 1)[1])["error"]["type"] == "api_error"


def test_llama_servers_openai_shaped_errors_on_anthropic_routes_are_reshaped():
    upstream = json.dumps({"error": {"code": 400, "message": "context too long", "type": "exceed_context_size_error"}})
    reshaped = json.loads(upstream_error(Dialect.ANTHROPIC, upstream.encode(), 400))
    assert reshaped == {"type": "error", "error": {"type": "invalid_request_error", "message": "context too long"}}
    assert upstream_error(Dialect.OPENAI, upstream.encode(), 400) == upstream.encode()
    assert upstream_error(Dialect.ANTHROPIC, b"not json", 500) == b"not json"


@pytest.mark.parametrize(
    "ending",
    [b"event: response.completed\ndata: {}\n\n", b"event: message_stop\ndata: {}\n\n", b"event: error\ndata: {}\n\n"],
)
def test_responses_and_anthropic_streams_that_say_how_they_ended_are_complete(ending):
    end = StreamEnd()
    end.feed(b"event: response.created\ndata: {}\n\n")
    assert not end.complete
    end.feed(ending)
    assert end.complete


def test_filters_strip_and_set_and_say_when_they_change_nothing():
    filters = Filters(strip_params=["reasoning_effort"], set_params={"temperature": 0.2})
    assert filters.apply({"model": "m", "reasoning_effort": "high", "temperature": 1}) == {
        "model": "m",
        "temperature": 0.2,
    }
    assert filters.apply({"model": "m", "temperature": 0.2}) is None
    assert Filters().apply({"model": "m"}) is None


def test_the_readme_lists_every_route_with_what_it_does_and_its_backends():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = r"^\| `POST ([^`]+)` \| ([^|]+) \| ((?:llamacpp|ollama)(?:, (?:llamacpp|ollama))*) \|$"
    rows = {m[0]: (m[1], m[2]) for m in re.findall(table, readme, re.M)}
    assert {route.path: (route.what, ", ".join(sorted(route.backends))) for route in MODEL_ROUTES} == {
        path: (what.strip(), backends.strip()) for path, (what, backends) in rows.items()
    }


def test_an_anthropic_stream_without_message_start_gets_one_and_a_complete_one_is_left_alone():
    from supervisor.api.streams import with_message_start

    started = b'event: message_start\ndata: {"type":"message_start"}\n\n'
    assert with_message_start(started, "tiny") == started
    block = b'event: content_block_start\ndata: {"type":"content_block_start","index":0}\n\n'
    fixed = with_message_start(block, "tiny")
    head, rest = fixed.split(b"\n\n", 1)
    assert head.startswith(b"event: message_start\ndata: ") and rest == block
    message = json.loads(head.split(b"data: ", 1)[1])["message"]
    assert (message["role"], message["model"], message["content"]) == ("assistant", "tiny", [])
