"""The control API's answers as pydantic models: the daemon's status, a model's description, the devices, the
health check, config changes and their history, and the errors.

They are the one statement of those shapes. control.py sends its answers through them (``control.answer``), and
control_openapi.py generates the OpenAPI document's schemas from them (``component_schemas``), so the document
cannot say other than what is served. A key that the fleet starts returning and a model here lacks is refused
(``extra="forbid"``): tests/unit/test_control_models.py finds it on a real fleet before any client does.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, SkipJsonSchema, models_json_schema
from pydantic_core import core_schema

from supervisor.config.access import Role
from supervisor.core.errors import error_codes
from supervisor.core.slots import Phase

REF_TEMPLATE = "#/components/schemas/{model}"


class Answer(BaseModel):
    """Base of every answer: a key the model does not name is a bug (the two have drifted), not data to pass on."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# -- a model's description (GET /models/{name}, /models, /status, load, unload) --------------------------------


class MemoryEstimate(Answer):
    """Bytes the model needs on its device, from its GGUF header and launch settings (estimate.py)."""

    weights: int
    output_head: int
    kv_cache: int
    compute: int
    outputs: int
    overhead: int
    total: int
    offloaded_layers: int
    total_layers: int


class PartialOffload(Answer):
    """An Ollama model partly on the CPU: what /api/ps reports."""

    size_vram: int
    size: int


class ModelMemory(Answer):
    """What a model needs, in bytes, and each number it comes from."""

    need: int = Field(description="the bytes it is admitted with")
    declared: int | None = Field(description="the catalog's memory:")
    ollama_estimate: int | None = Field(description="Ollama: estimated from /api/show")
    estimate: MemoryEstimate | None
    estimate_problem: str | None = Field(description="why there is no estimate")
    learned: int | None = Field(description="learned from earlier runs")
    measured: int | None = Field(description="what it uses now, on the last look")
    peak: int | None = Field(description="the most it used in this run")
    partial_offload: PartialOffload | None


class Model(Answer):
    """One model of the catalog: its state, where it runs, its memory and its last error."""

    name: str
    aliases: list[str]
    backend: Literal["llamacpp", "ollama"]
    tag: str | None = Field(description="Ollama: its name in Ollama")
    state: Phase
    device: str | None = Field(description="where it runs or starts: cpu, gpu0, gpu1...")
    container: str | None = Field(description="its container's short id")
    config_hash: str | None
    port: int | None
    endpoint: str | None = Field(description="unix:<name> (a socket only localllm reaches) or tcp:<port>")
    preload: bool
    pinned: bool
    ttl: float | None = Field(description="seconds idle before it is unloaded")
    in_flight: int
    waiting: int
    last_used: float | None = Field(description="Unix time")
    ready_at: float | None = Field(description="Unix time")
    load_seconds: float | None
    memory: ModelMemory
    error: str | None
    failures: int = Field(description="consecutive failed starts or crashes")
    gave_up: bool = Field(description="it failed too often: no more starts until a new config")


class ModelList(Answer):
    models: list[Model]


# -- the daemon (GET /status, /health) ---------------------------------------------------------------------------


class Device(Answer):
    """Memory models may use on one device."""

    id: str = Field(description="cpu, gpu0, gpu1...")
    uuid: str | None = Field(description="the GPU's UUID, when NVML gave one")
    budget: int = Field(description="bytes models may use: total minus reserved minus the reserve")
    measured_free: int | None = Field(description="free bytes minus the reserve, last read")
    problem: str | None = Field(description="why the device cannot be used, if so")


class DaemonStatus(Answer):
    version: str
    pid: int
    instance: str
    profile: str
    profile_reason: str
    docker_version: str
    proxy: list[str] = Field(description="the proxy's URLs")
    started_at: float = Field(description="Unix time")
    uptime_seconds: float
    degraded: str | None = Field(description="a config change failed and could not be undone: what is wrong")
    generation: int | None = Field(description="the active config generation")
    last_good: int | None
    last_event_id: int


class Status(Answer):
    daemon: DaemonStatus
    devices: list[Device]
    models: list[Model]


class Health(Answer):
    status: Literal["ok", "unhealthy"]
    problems: list[str]
    pid: int
    version: str
    uptime_seconds: float


# -- config changes (GET /history, POST /apply, /rollback) --------------------------------------------------------


class Generation(Answer):
    """One recorded config."""

    number: int
    created_at: float = Field(description="Unix time")
    source: str = Field(description="where the config came from: a path, sighup, rollback to N")
    status: Literal["pending", "good", "failed", "invalid"]
    hashes: dict[str, str] = Field(description="model -> config hash of its wanted container")
    reason: str
    secrets: bool = Field(description="its secrets are stored apart from its text")
    path: str = Field(description="the file it was read from")
    active: bool
    last_good: bool


class History(Answer):
    generations: list[Generation] = Field(description="oldest first")


class ChangePlan(Answer):
    """What a config change does to the models, by name."""

    keep: list[str]
    replace: list[str]
    remove: list[str]
    add: list[str]
    update: list[str]


class Preview(Answer):
    """What applying a config would do (POST /validate)."""

    valid: bool
    profile: str
    models: int = Field(description="how many models its catalog has")
    plan: ChangePlan
    diff: str = Field(description="unified diff against the active generation's text, secrets redacted")


class ApplyReport(Answer):
    """A config change's outcome (POST /apply, /rollback; an apply_failed error carries it too)."""

    generation: int
    source: str
    plan: ChangePlan
    status: Literal["good", "failed"]
    reason: SkipJsonSchema[None] | str = Field(None, description="failed: why")
    degraded: str | None = Field(None, description="failed: what could not be brought back, if anything")


# -- errors ------------------------------------------------------------------------------------------------------


class ErrorDetail(Answer):
    message: str
    type: str = Field(description="OpenAI's error type: invalid_request_error, permission_error, server_error")
    param: str | None
    code: str = Field(json_schema_extra={"enum": error_codes()})
    needed_role: SkipJsonSchema[None] | Role = Field(None, description="forbidden: the role the route needs")


class Error(Answer):
    """Every refusal and failure (errors.py), OpenAI-style."""

    error: ErrorDetail
    report: SkipJsonSchema[None] | ApplyReport = Field(None, description="apply_failed: the change's report")


RESPONSES = (Status, ModelList, Model, Health, History, Preview, ApplyReport, Error)


class OpenApi30(GenerateJsonSchema):
    """JSON Schema as OpenAPI 3.0 writes it: ``nullable`` rather than a null type, and a reference with
    siblings (which 3.0 ignores) as an ``allOf`` of one. No field titles, and no defaults: these are answers."""

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        inner = self.generate_inner(schema["schema"])
        return {"allOf": [inner], "nullable": True} if "$ref" in inner else {**inner, "nullable": True}

    def handle_ref_overrides(self, json_schema: JsonSchemaValue) -> JsonSchemaValue:
        json_schema = super().handle_ref_overrides(json_schema)
        if "$ref" in json_schema and len(json_schema) > 1:
            siblings = {k: v for k, v in json_schema.items() if k != "$ref"}
            return {"allOf": [{"$ref": json_schema["$ref"]}], **siblings}
        return json_schema

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])

    def field_title_should_be_set(self, schema) -> bool:
        return False


def component_schemas() -> dict[str, dict]:
    """The schemas of every answer and of what they contain, by name, referring to each other as
    ``#/components/schemas/<name>``."""
    _, document = models_json_schema(
        [(model, "serialization") for model in RESPONSES], ref_template=REF_TEMPLATE, schema_generator=OpenApi30
    )
    schemas = document["$defs"]
    for schema in schemas.values():
        if schema.get("additionalProperties") is False:
            del schema["additionalProperties"]  # a later version may add keys: clients should expect that
    return schemas
