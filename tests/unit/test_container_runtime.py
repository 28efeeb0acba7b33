"""The ContainerRuntime protocol: Docker's runtime and the owner's recording fake both implement it."""

from __future__ import annotations

import inspect

import pytest

from supervisor.runtime.container_runtime import ContainerRuntime
from supervisor.runtime.docker_runtime import DockerRuntime

from .fleet_harness import RecordingFakeRuntime

METHODS = sorted(name for name, value in vars(ContainerRuntime).items() if callable(value) and not name.startswith("_"))


def test_the_protocol_names_what_the_fleet_uses():
    assert METHODS == [
        "inspect",
        "list_labelled",
        "logs_stream",
        "logs_tail",
        "ping",
        "remove_networks",
        "run",
        "stop_and_remove",
    ]


@pytest.mark.parametrize("implementation", [DockerRuntime, RecordingFakeRuntime], ids=["docker", "fake"])
@pytest.mark.parametrize("method", METHODS)
def test_an_implementation_has_each_method_with_the_protocols_parameters(implementation, method):
    wanted = inspect.signature(getattr(ContainerRuntime, method))
    found = inspect.signature(getattr(implementation, method))
    assert list(found.parameters) == list(wanted.parameters), f"{implementation.__name__}.{method}{found}"
    # awaited, or (logs_stream) iterated with async for
    kind = inspect.isasyncgenfunction if method == "logs_stream" else inspect.iscoroutinefunction
    assert kind(getattr(implementation, method))
