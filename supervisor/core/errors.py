"""The project's one error hierarchy.

Every error carries a stable machine-readable ``code``, the HTTP status the
proxy and control API answer with, and the exit status ``localllmctl`` and
``localllmd`` use. This is the only place those mappings live.

Each class also says whether its message may reach a client of the proxy as it
is (``client_safe``): messages that can carry what a container printed, host
paths, the Docker socket or internal addresses may not. The proxy tells its
clients the class's ``summary()`` and an error id instead (web_errors.py); the
control API and the log keep the whole message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Exit statuses, documented in the README.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3


class LocalllmError(Exception):
    """Base of every error the project raises on purpose."""

    code = "internal_error"
    http_status = 500
    exit_code = EXIT_FAILURE
    openai_type = "server_error"
    client_safe = False  # may a proxy client read the message as it is? (no: it gets summary() and an error id)

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def summary(self) -> str:
        """What a proxy client is told when it may not see the message: what failed, in a few words."""
        return "internal error"

    def to_json(self) -> dict[str, Any]:
        """OpenAI-style error object; the control API uses the same shape."""
        return {
            "error": {
                "message": self.message,
                "type": self.openai_type,
                "param": None,
                "code": self.code,
            }
        }


class ConfigError(LocalllmError):
    """A config or profile file is invalid; ``problems`` lists each finding."""

    code = "invalid_config"
    http_status = 400
    exit_code = EXIT_BAD_INPUT
    openai_type = "invalid_request_error"

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"invalid config {source}:\n{lines}")

    def summary(self) -> str:
        return "invalid config"


class BadRequest(LocalllmError):
    """What the client sent is wrong; the message says what, of the request alone."""

    code = "bad_request"
    http_status = 400
    exit_code = EXIT_BAD_INPUT
    openai_type = "invalid_request_error"
    client_safe = True


class RouteNotServed(BadRequest):
    """The model's backend has no such route (Ollama serves no ``/infill``, say)."""

    code = "route_not_served"


class UnknownModel(LocalllmError):
    code = "model_not_found"
    http_status = 404
    exit_code = EXIT_BAD_INPUT
    openai_type = "invalid_request_error"
    client_safe = True  # it lists the catalog's names, which GET /v1/models shows anyway

    def __init__(self, name: str, known: list[str]):
        self.name = name
        listed = ", ".join(sorted(known)) or "none"
        super().__init__(f"model '{name}' is not in the catalog (available: {listed})")

    def to_json(self) -> dict[str, Any]:
        body = super().to_json()
        body["error"]["param"] = "model"
        return body


class DockerUnavailable(LocalllmError):
    code = "docker_unavailable"
    http_status = 503
    exit_code = EXIT_UNREACHABLE

    def summary(self) -> str:
        return "the container engine is unavailable"


class ImageNotFound(LocalllmError):
    code = "image_not_found"
    http_status = 503

    def summary(self) -> str:
        return "a container image is missing"


class DockerFailure(LocalllmError):
    """The engine answered, but refused or failed an operation."""

    code = "docker_error"
    http_status = 502

    def summary(self) -> str:
        return "the container engine failed an operation"


class ModelStartFailed(LocalllmError):
    """A model's server did not become ready: it exited, or the deadline passed."""

    code = "model_start_failed"
    http_status = 503

    def __init__(self, model: str, reason: str, exit_code: int | None = None, log_tail: str = ""):
        self.model = model
        self.reason = reason
        self.container_exit_code = exit_code
        self.log_tail = log_tail
        super().__init__(f"model '{model}' failed to start: " + describe_exit(reason, exit_code, log_tail))

    def summary(self) -> str:
        return f"model '{self.model}' failed to start"


class ModelFileUnreadable(LocalllmError):
    """A model's GGUF file cannot be read: missing, cut short, not GGUF, or with implausible counts.

    The catalog names a file that is not what it should be: the operator's input, not a client's request.
    """

    code = "model_file_unreadable"
    http_status = 503  # the model cannot be served as its file stands, as with model_too_large
    exit_code = EXIT_BAD_INPUT

    def __init__(self, path: Path | str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"cannot read GGUF file {path}: {reason}")

    def summary(self) -> str:
        return "the model's file cannot be read"


class OllamaFailure(LocalllmError):
    """The Ollama server did not answer a call of its API (a list, a show, an unload), or answered it with an error.

    A load or pull that fails is a ModelStartFailed: that is a start. ``model``: the catalog name it was for.
    """

    code = "ollama_error"
    http_status = 502

    def __init__(self, model: str, message: str):
        self.model = model
        super().__init__(message)

    def summary(self) -> str:
        return "the Ollama server failed an operation"


def describe_exit(reason: str, exit_code: int | None, log_tail: str) -> str:
    """``reason (exit code N)`` followed by the container's last log lines, if any."""
    text = reason if exit_code is None else f"{reason} (exit code {exit_code})"
    return text + (f"\n--- last log lines ---\n{log_tail}" if log_tail else "")


class UpstreamFailed(LocalllmError):
    """The model's server could not be reached or broke off mid-request.

    ``public``: what a proxy client may be told of it (the message without the transport's or the
    container's details); without it, a generic summary.
    """

    code = "upstream_failed"
    http_status = 502

    def __init__(self, message: str, public: str | None = None):
        super().__init__(message)
        self.public = public

    def summary(self) -> str:
        return self.public or "the model's server failed while serving the request"


class UpstreamTimeout(UpstreamFailed):
    """The model's server took no connection, or did not answer, within its deadline (``daemon.timeouts``)."""

    code = "upstream_timeout"
    http_status = 504

    def summary(self) -> str:
        return self.public or "the model's server did not answer in time"


class ShuttingDown(LocalllmError):
    """The daemon is stopping: nothing new starts."""

    code = "shutting_down"
    http_status = 503
    client_safe = True


class ControlUnreachable(LocalllmError):
    code = "control_unreachable"
    exit_code = EXIT_UNREACHABLE


class CannotListen(LocalllmError):
    code = "cannot_listen"


class AlreadyRunning(LocalllmError):
    code = "already_running"


class ModelTooLarge(LocalllmError):
    """The model can never fit the memory budget as configured."""

    code = "model_too_large"
    http_status = 503
    client_safe = True  # sizes and budgets in MiB: what the client needs to see the refusal is final


class Overloaded(LocalllmError):
    """Too many requests are waiting, or one waited too long; ``retry_after`` is in seconds."""

    http_status = 503
    client_safe = True  # counts and limits of our own queues

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(Overloaded):
    code = "queue_full"


class QueueTimeout(Overloaded):
    code = "queue_timeout"


class ConcurrencyLimit(Overloaded):
    """A model's ``max_concurrent`` requests are in flight: this one is refused at once, not queued."""

    code = "concurrency_limit"
    http_status = 429
    openai_type = "rate_limit_error"


class UpstreamBusy(Overloaded):
    """The model's server itself refused the request as busy (Ollama past ``OLLAMA_MAX_QUEUE``).

    Its message quotes the server's answer to this request, as the proxy passes any other answer on.
    """

    code = "upstream_busy"


class BodyBudgetExceeded(Overloaded):
    """The request bodies being received already fill ``daemon.proxy_limits.body_budget``."""

    code = "body_budget_exceeded"


class TooManyConnections(Overloaded):
    """The proxy holds ``daemon.proxy_limits.max_connections`` connections, all of them busy."""

    code = "too_many_connections"


class ModelGaveUp(LocalllmError):
    """The model failed too many times in a row; it stays down until an operator acts or the config changes."""

    code = "model_failed"
    http_status = 503

    def summary(self) -> str:
        return "the model failed too many times in a row and is not restarted until an operator acts"


class StateWriteFailed(LocalllmError):
    code = "state_write_failed"
    http_status = 507


class ApplyRefused(LocalllmError):
    code = "apply_refused"
    http_status = 409
    exit_code = EXIT_BAD_INPUT


class Conflict(LocalllmError):
    """Another admin operation on the same thing is in progress: try again when it is done."""

    code = "conflict"
    http_status = 409


class ModelBusy(LocalllmError):
    """The operation would cut requests short (unload of a model that is serving)."""

    code = "model_busy"
    http_status = 409


class ModelStayedBusy(ModelBusy):
    """A config change waited as long as it may for the model's requests to end and its server to stop."""

    code = "model_stayed_busy"


class ModelNotRunning(LocalllmError):
    code = "model_not_running"
    http_status = 409


class ApplyFailed(LocalllmError):
    code = "apply_failed"
    http_status = 422

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "report": self.report}


class InvalidToken(LocalllmError):
    """The TCP control API needs ``Authorization: Bearer <daemon.control_token>``."""

    code = "invalid_token"
    http_status = 401


class Forbidden(LocalllmError):
    """The caller is known, but its role does not allow this action; ``needed`` names the role that does."""

    code = "forbidden"
    http_status = 403
    openai_type = "permission_error"

    def __init__(self, message: str, needed: str):
        super().__init__(message)
        self.needed = needed

    def to_json(self) -> dict[str, Any]:
        body = super().to_json()
        body["error"]["needed_role"] = self.needed
        return body


class InvalidApiKey(LocalllmError):
    code = "invalid_api_key"
    http_status = 401
    openai_type = "invalid_request_error"
    client_safe = True


class EdgeRefusal(LocalllmError):
    """The proxy's network edge refuses a request for its form (README: Security model); the client's fault."""

    openai_type = "invalid_request_error"
    client_safe = True


class UnsupportedMediaType(EdgeRefusal):
    """A JSON route's body must say ``Content-Type: application/json``: a web page can send text/plain to a
    loopback address across origins without asking first, and application/json it cannot."""

    code = "unsupported_media_type"
    http_status = 415


class LengthRequired(EdgeRefusal):
    """A body must say its size (Content-Length) before it is read: that is what the body budget counts."""

    code = "length_required"
    http_status = 411


class RequestTooLarge(EdgeRefusal):
    code = "request_too_large"
    http_status = 413


class RequestTimeout(EdgeRefusal):
    """The request's head or body did not arrive within its deadline (daemon.proxy_limits)."""

    code = "request_timeout"
    http_status = 408


class HeadTooLarge(EdgeRefusal):
    code = "request_header_too_large"
    http_status = 431


class HostNotAllowed(EdgeRefusal):
    """The request's Host is not in ``daemon.allowed_hosts`` (a page on another name, DNS-rebound to us)."""

    code = "host_not_allowed"
    http_status = 421


# Codes of errors that did not come from our hierarchy (aiohttp's routing), as the web layer names them.
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 417: "expectation_failed"}


class RemoteError(LocalllmError):
    """localllmctl's side: an error the daemon answered with, and its stable ``code``; bad input on our side exits 2,
    anything else 1."""

    BAD_INPUT = {ConfigError.code, BadRequest.code, ApplyRefused.code, UnknownModel.code, HTTP_ERROR_CODES[404]}

    def __init__(self, message: str, code: str, body: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.body = body or {}
        self.exit_code = EXIT_BAD_INPUT if code in self.BAD_INPUT else EXIT_FAILURE


def error_codes() -> list[str]:
    """Every stable error code an API answer may carry (for the OpenAPI document and the README)."""
    found, todo = set(), [LocalllmError]
    while todo:
        cls = todo.pop()
        found.add(cls.code)
        todo.extend(cls.__subclasses__())
    return sorted(found | set(HTTP_ERROR_CODES.values()) | {"http_error"})
