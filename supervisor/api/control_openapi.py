"""The control API's OpenAPI 3.0 document, served at ``GET /openapi.json``.

The paths are written here; the schemas of the answers are generated from their pydantic models
(control_models.py), which the handlers send their answers through. A unit test checks that the document
names exactly the routes the app serves and is valid OpenAPI 3.0, and schemathesis checks the app against it.
Each operation's role (``x-localllm-role``) comes from ``access.ROUTE_ROLES``.
"""

from __future__ import annotations

from functools import cache

from supervisor import __version__
from supervisor.api.control_models import component_schemas
from supervisor.config.access import ROUTE_ROLES, Role

JSON = "application/json"


def _ok(description: str, schema: dict | None = None, media: str = JSON) -> dict:
    return {"description": description, "content": {media: {"schema": schema or {"type": "object"}}}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict:
    return {"description": description, "content": {JSON: {"schema": _ref("Error")}}}


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


MODEL_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "model name or alias",
}
BOOL = {"type": "string", "enum": ["true", "false", "1", "0"]}
CONFIG_BODY = {
    "required": True,
    "content": {
        JSON: {
            "schema": {
                "type": "object",
                "required": ["config", "source"],
                "properties": {
                    "config": {"type": "string", "description": "the config file's text"},
                    "source": {"type": "string", "description": "its absolute path (relative model paths)"},
                },
            }
        }
    },
}
COMMON = {
    "401": _error("TCP only: missing or wrong Bearer token (invalid_token)"),
    "500": _error("a bug: see the daemon's log"),
}


def _operation(summary: str, responses: dict, parameters: list | None = None, body: dict | None = None) -> dict:
    operation = {"summary": summary, "responses": {**responses, **COMMON}}
    if parameters:
        operation["parameters"] = parameters
    if body:
        operation["requestBody"] = body
    return operation


@cache
def openapi_document() -> dict:
    model = _ref("Model")
    paths = {
        "/openapi.json": {"get": _operation("this document", {"200": _ok("OpenAPI 3.0 document")})},
        "/health": {
            "get": _operation(
                "the daemon's own health",
                {
                    "200": _ok("healthy", _ref("Health")),
                    "503": _ok(
                        "unhealthy: engine unreachable, degraded, a device unusable, or a model failed", _ref("Health")
                    ),
                },
            )
        },
        "/status": {"get": _operation("the daemon and every model", {"200": _ok("status", _ref("Status"))})},
        "/models": {"get": _operation("every model of the catalog", {"200": _ok("models", _ref("ModelList"))})},
        "/models/{name}": {
            "get": _operation(
                "one model",
                {"200": _ok("the model", model), "404": _error("no such model (model_not_found)")},
                [MODEL_NAME],
            )
        },
        "/models/{name}/load": {
            "post": _operation(
                "start the model now and wait until it is ready",
                {
                    "200": _ok("ready", model),
                    "404": _error("no such model"),
                    "409": _error("another load/unload of it, or a config change, is in progress (conflict)"),
                    "503": _error(
                        "it could not start (model_start_failed, model_too_large, model_failed, "
                        "queue_full, queue_timeout, shutting_down)"
                    ),
                },
                [MODEL_NAME],
            )
        },
        "/models/{name}/unload": {
            "post": _operation(
                "stop the model now and wait until its container is gone",
                {
                    "200": _ok("stopped", model),
                    "404": _error("no such model"),
                    "409": _error("it serves requests (model_busy), is starting, or another operation runs (conflict)"),
                    "503": _error("shutting down"),
                },
                [MODEL_NAME],
            )
        },
        "/models/{name}/memory": {
            "get": _operation(
                "what the model needs and where the number comes from (declared, measured, learned, the GGUF header, "
                "Ollama's /api/show, or a placeholder)",
                {"200": _ok("the memory need"), "404": _error("no such model")},
                [MODEL_NAME],
            )
        },
        "/models/{name}/logs": {
            "get": _operation(
                "the output of the model's container, as text",
                {
                    "200": _ok(
                        "log lines; with follow, streamed until the container exits", {"type": "string"}, "text/plain"
                    ),
                    "400": _error("bad query parameter"),
                    "404": _error("no such model"),
                    "409": _error("it has no container (model_not_running)"),
                },
                [
                    MODEL_NAME,
                    _query(
                        "tail",
                        {"type": "integer", "minimum": 0, "maximum": 100000, "default": 100},
                        "lines from the end",
                    ),
                    _query("follow", BOOL, "keep streaming new output"),
                ],
            )
        },
        "/events": {
            "get": _operation(
                "server-sent events: state changes, loads, swaps, crashes, restarts, config changes",
                {
                    "200": _ok(
                        "text/event-stream of Event objects (id, event: kind, data: JSON)",
                        {"type": "string"},
                        "text/event-stream",
                    ),
                    "400": _error("bad query parameter"),
                    "404": _error("no such model"),
                },
                [
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 0, "maximum": 1000, "default": 50},
                        "recent events to send first",
                    ),
                    _query(
                        "after", {"type": "integer", "minimum": 0}, "only events with a greater id (or Last-Event-ID)"
                    ),
                    _query("follow", BOOL, "keep the stream open for new events"),
                    _query("model", {"type": "string"}, "only this model's events"),
                ],
            )
        },
        "/validate": {
            "post": _operation(
                "check a config and show what applying it would change",
                {
                    "200": _ok("valid; the plan and a unified diff against the active generation", _ref("Preview")),
                    "400": _error("invalid config (invalid_config, with FILE:LINE problems) or body (bad_request)"),
                    "409": _error("changes only a restart applies (apply_refused)"),
                },
                body=CONFIG_BODY,
            )
        },
        "/apply": {
            "post": _operation(
                "apply a config: a new generation, health-gated, reverted on failure",
                {
                    "200": _ok("the generation is live and last-good", _ref("ApplyReport")),
                    "400": _error("invalid config or body"),
                    "409": _error("another apply runs (conflict), or it needs a restart (apply_refused)"),
                    "422": _error("it failed its health gate and was reverted (apply_failed, with the report)"),
                    "503": _error("shutting down"),
                    "507": _error("the state directory cannot be written"),
                },
                body=CONFIG_BODY,
            )
        },
        "/history": {
            "get": _operation("the recorded generations, oldest first", {"200": _ok("generations", _ref("History"))})
        },
        "/rollback": {
            "post": _operation(
                "apply a recorded generation again (default: the last good one before the active one)",
                {
                    "200": _ok("rolled back", _ref("ApplyReport")),
                    "400": _error("bad body"),
                    "409": _error("no such generation, or another apply runs"),
                    "422": _error("it failed its health gate and was reverted"),
                },
                body={
                    "required": True,
                    "content": {
                        JSON: {
                            "schema": {
                                "type": "object",
                                "properties": {"generation": {"type": "integer", "nullable": True, "minimum": 1}},
                            }
                        }
                    },
                },
            )
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics", {"200": _ok("text exposition format", {"type": "string"}, "text/plain")}
            )
        },
    }
    for path, operations in paths.items():
        for method, operation in operations.items():
            role = ROUTE_ROLES[(method.upper(), path)]
            operation["x-localllm-role"] = str(role)
            if role is not Role.VIEWER:
                operation["responses"]["403"] = _error(
                    f"the caller's role is below {role} (forbidden; the body names needed_role and how to get it)"
                )
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "localllmd control API",
            "version": __version__,
            "description": "Each operation needs a role (x-localllm-role): viewer, operator or admin, each with "
            "all the one before it has. On the unix sockets the socket gives the role (one per "
            "role); on TCP (daemon.control_listen) the Bearer token does.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "security": [{"bearer": []}, {}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": component_schemas(),
        },
    }
