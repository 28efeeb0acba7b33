"""The control API's OpenAPI document names exactly the routes the app serves, with their roles, and its error
codes are complete."""

from __future__ import annotations

from supervisor.access import ROUTE_ROLES, Role
from supervisor.control import create_control_app
from supervisor.control_openapi import openapi_document
from supervisor.errors import LocalllmError, error_codes


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
    enum = openapi_document()["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
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
