"""The control API's OpenAPI document names exactly the routes the app serves, with their roles; it is valid
OpenAPI 3.0, its schemas are generated from the answers' models, and its error codes are complete."""

from __future__ import annotations

import json

from schemathesis.specs.openapi.definitions import OPENAPI_30_VALIDATOR

from supervisor.api.control import create_control_app
from supervisor.api.control_models import RESPONSES, component_schemas
from supervisor.api.control_openapi import openapi_document
from supervisor.config.access import ROUTE_ROLES, Role
from supervisor.core.errors import LocalllmError, error_codes


class NoMetrics:
    async def handler(self, request):
        raise AssertionError("not called")


def served_routes(metrics=None) -> set[tuple[str, str]]:
    app = create_control_app(fleet=None, facts=None, rollout=None, events=None, metrics=metrics)
    return {(route.method.lower(), route.resource.canonical) for route in app.router.routes() if route.method != "HEAD"}


def documented_routes() -> set[tuple[str, str]]:
    return {(method, path) for path, operations in openapi_document()["paths"].items() for method in operations}


def test_document_and_app_have_the_same_routes():
    assert documented_routes() == served_routes(NoMetrics())


def test_every_operation_documents_its_errors_and_auth():
    for path, operations in openapi_document()["paths"].items():
        for method, operation in operations.items():
            assert "200" in operation["responses"], (method, path)
            assert "401" in operation["responses"], (method, path)  # the TCP listener's token
            assert operation["summary"], (method, path)


def test_error_code_enum_lists_every_code_of_the_hierarchy():
    schemas = openapi_document()["components"]["schemas"]
    assert schemas["Error"]["properties"]["error"] == {"$ref": "#/components/schemas/ErrorDetail"}
    enum = schemas["ErrorDetail"]["properties"]["code"]["enum"]
    assert enum == error_codes()
    assert {"conflict", "model_busy", "model_not_running", "invalid_token", "model_not_found"} <= set(enum)
    assert {cls.code for cls in LocalllmError.__subclasses__()} <= set(enum)


def test_every_operation_names_its_role_and_the_refusal_above_viewer():
    for path, operations in openapi_document()["paths"].items():
        for method, operation in operations.items():
            role = ROUTE_ROLES[(method.upper(), path)]
            assert operation["x-localllm-role"] == role, (method, path)
            assert ("403" in operation["responses"]) is (role is not Role.VIEWER), (method, path)
    assert openapi_document()["paths"]["/apply"]["post"]["x-localllm-role"] == "admin"
    assert openapi_document()["paths"]["/models/{name}/load"]["post"]["x-localllm-role"] == "operator"


def test_document_is_valid_openapi_3_0():
    document = openapi_document()
    assert document["openapi"] == "3.0.3"
    OPENAPI_30_VALIDATOR.validate(json.loads(json.dumps(document)))  # the official schema: no 3.1 `type: null`


def refs_in(node) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if "$ref" in node else []) + [r for value in node.values() for r in refs_in(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs_in(value)]
    return []


def test_every_reference_resolves_and_every_schema_is_used():
    document = openapi_document()
    schemas = document["components"]["schemas"]
    refs = set(refs_in(document))
    assert {ref.removeprefix("#/components/schemas/") for ref in refs} == set(schemas)
    assert all(ref.startswith("#/components/schemas/") for ref in refs)


def test_the_schemas_are_generated_from_the_answers_models():
    schemas = openapi_document()["components"]["schemas"]
    assert schemas == component_schemas()
    for model in RESPONSES:
        assert set(schemas[model.__name__]["properties"]) == set(model.model_fields), model
    model = schemas["Model"]
    assert set(model["required"]) == set(model["properties"])  # describe() always returns every key
    assert model["properties"]["state"] == {"$ref": "#/components/schemas/Phase"}
    assert model["properties"]["endpoint"]["nullable"] is True
    assert model["properties"]["memory"] == {"$ref": "#/components/schemas/ModelMemory"}
    assert schemas["ModelMemory"]["properties"]["estimate"] == {
        "allOf": [{"$ref": "#/components/schemas/MemoryEstimate"}],
        "nullable": True,
    }
    assert "additionalProperties" not in model  # a later version may add keys


def test_each_route_names_the_schema_of_its_answer():
    paths = openapi_document()["paths"]

    def schema_of(path: str, method: str, status: str = "200") -> dict:
        return paths[path][method]["responses"][status]["content"]["application/json"]["schema"]

    expected = {
        ("/status", "get"): "Status",
        ("/models", "get"): "ModelList",
        ("/models/{name}", "get"): "Model",
        ("/models/{name}/load", "post"): "Model",
        ("/models/{name}/unload", "post"): "Model",
        ("/health", "get"): "Health",
        ("/history", "get"): "History",
        ("/validate", "post"): "Preview",
        ("/apply", "post"): "ApplyReport",
        ("/rollback", "post"): "ApplyReport",
    }
    for (path, method), name in expected.items():
        assert schema_of(path, method) == {"$ref": f"#/components/schemas/{name}"}, path
    assert schema_of("/health", "get", "503") == {"$ref": "#/components/schemas/Health"}
    assert schema_of("/apply", "post", "422") == {"$ref": "#/components/schemas/Error"}
