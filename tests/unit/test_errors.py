"""supervisor.core.errors: each failure has a class of its own, with its code, HTTP status and exit status; every code
of the hierarchy is in error_codes() and in the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from supervisor.core import errors
from supervisor.core.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    BadRequest,
    LocalllmError,
    ModelBusy,
    ModelFileUnreadable,
    ModelStartFailed,
    ModelStayedBusy,
    OllamaFailure,
    RemoteError,
    ShuttingDown,
    error_codes,
)

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
NEVER_ANSWERED = {  # the daemon's and localllmctl's own failures: an exit status, never an API answer
    "already_running",
    "cannot_listen",
    "control_unreachable",
}


def test_a_change_that_waited_out_a_busy_model_is_not_a_shutdown():
    error = ModelStayedBusy("'m' stayed busy for 120s; try the change again later")
    assert isinstance(error, ModelBusy) and not isinstance(error, ShuttingDown)
    assert (error.code, error.http_status, error.exit_code) == ("model_stayed_busy", 409, EXIT_FAILURE)


def test_an_ollama_failure_is_its_own_class_and_a_bad_gateway():
    error = OllamaFailure("m", "Ollama /api/ps did not answer: ...")
    assert not isinstance(error, ModelStartFailed)
    assert (error.code, error.http_status, error.model, error.client_safe) == ("ollama_error", 502, "m", False)
    assert (
        error.message == "Ollama /api/ps did not answer: ..."
        and error.summary() == "the Ollama server failed an operation"
    )


def test_an_unreadable_model_file_is_not_a_bad_request():
    error = ModelFileUnreadable(Path("/srv/m.gguf"), "not a GGUF file (no GGUF magic)")
    assert not isinstance(error, BadRequest)
    assert error.message == "cannot read GGUF file /srv/m.gguf: not a GGUF file (no GGUF magic)"
    assert (error.code, error.http_status, error.exit_code) == ("model_file_unreadable", 503, EXIT_BAD_INPUT)


@pytest.mark.parametrize(
    "code, exit_code",
    [
        ("invalid_config", EXIT_BAD_INPUT),
        ("bad_request", EXIT_BAD_INPUT),
        ("apply_refused", EXIT_BAD_INPUT),
        ("model_not_found", EXIT_BAD_INPUT),
        ("not_found", EXIT_BAD_INPUT),
        ("conflict", EXIT_FAILURE),
        ("apply_failed", EXIT_FAILURE),
        ("overflow", EXIT_FAILURE),
        ("", EXIT_FAILURE),
    ],
)
def test_a_remote_error_lives_in_the_hierarchy_and_exits_by_its_code(code, exit_code):
    error = RemoteError("refused", code, {"error": {"code": code}})
    assert isinstance(error, LocalllmError) and RemoteError.__module__ == errors.__name__
    assert (error.code, error.exit_code, error.body) == (code, exit_code, {"error": {"code": code}})


def test_the_new_codes_are_listed():
    assert {"ollama_error", "model_file_unreadable", "model_stayed_busy"} <= set(error_codes())


def test_the_readme_documents_every_code_an_answer_may_carry():
    rows = [line for line in README.splitlines() if re.match(r"^\| \d{3} \|", line)]  # the error tables' rows
    documented = set(re.findall(r"`([a-z_]+)`", "\n".join(rows)))
    assert sorted(set(error_codes()) - NEVER_ANSWERED - documented) == []
