"""The control API's answers and their models (control_models.py), on a real fleet without Docker (fleet_harness):
every key ``describe()`` returns is in the Model and the other way round, what the API serves is the JSON the fleet
and the rollout returned, and every error the daemon can answer with fits the Error schema."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
import typing
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from aiohttp import test_utils
from pydantic import BaseModel, ValidationError

from supervisor.api.control import DaemonFacts, answer, create_control_app
from supervisor.api.control_models import (
    ApplyReport,
    Error,
    Health,
    History,
    MemoryEstimate,
    Model,
    ModelList,
    ModelMemory,
    PartialOffload,
    Preview,
    Status,
)
from supervisor.config.access import Gate, Role
from supervisor.config.profiles import load_profiles
from supervisor.config.settings import ModelEntry
from supervisor.core import errors
from supervisor.core.containers import servers_dir
from supervisor.core.estimate import Estimate
from supervisor.fleet.rollout import Rollout
from supervisor.runtime.upstream import open_session
from supervisor.state.generations import GenerationStore

from .fleet_harness import GIB, FakeGpuSession, gpu_fleet, gpu_reading

ONE_GPU = load_profiles()["gpu-1x24g"]
FAILED_REPORT = {
    "generation": 2,
    "source": "/etc/localllm/config.yaml",
    "plan": {"keep": [], "replace": ["m"], "remove": [], "add": [], "update": []},
    "status": "failed",
    "reason": "health gate failed: m: exited",
    "degraded": None,
}


def scenario(body, state_dir: Path):
    """Run ``body(session)`` on a fresh loop with the daemon's kind of session (sockets under ``state_dir``)."""

    async def run():
        async with open_session(servers_dir(state_dir)) as session:
            return await body(session)

    return asyncio.run(run())


async def load_on_gpu(fleet, runtime, gpus, name: str, load) -> None:
    """Run ``load`` (a coroutine that loads ``name``); its container shows up on the GPU as soon as it runs."""

    async def show_up():
        while not fleet.instances[name].container_id:
            await asyncio.sleep(0.01)
        gpus.put(runtime.containers[fleet.instances[name].container_id].pids[0], GIB)

    helper = asyncio.ensure_future(show_up())
    result = await load
    await helper
    return result


def every_number_filled(fleet) -> None:
    """Give the nested parts of a description that start out null (estimate, partial offload) a value, so their
    keys are compared too."""
    for instance in fleet.instances.values():
        instance.sizing = replace(instance.sizing, estimate=Estimate(3 * GIB, GIB, 10, 20, 24, 25, 5, 30))
        instance.offload = (GIB, 2 * GIB)


def wire(data) -> str:
    """``data`` as JSON on the wire, compared regardless of key order and spacing (1 and 1.0 differ)."""
    return json.dumps(json.loads(json.dumps(data)), sort_keys=True)


def keys_of(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def test_every_key_describe_returns_is_in_the_model_and_back(tmp_path):
    gpus = FakeGpuSession([gpu_reading(0)])

    async def body(session):
        fleet, runtime, _ = gpu_fleet(tmp_path, ONE_GPU, session, gpus, {"m": 4 * GIB, "idle": 2 * GIB})
        every_number_filled(fleet)
        await load_on_gpu(fleet, runtime, gpus, "m", fleet.load("m"))
        await fleet.tick()  # measured
        descriptions = [fleet.describe(i) for i in fleet.instances.values()]
        await fleet.shutdown()
        return descriptions

    descriptions = scenario(body, tmp_path)
    assert {d["state"] for d in descriptions} == {"ready", "stopped"}
    for described in descriptions:
        assert set(described) == keys_of(Model), "describe() and the Model have drifted: update control_models.py"
        assert set(described["memory"]) == keys_of(ModelMemory)
        assert set(described["memory"]["estimate"]) == keys_of(MemoryEstimate)
        assert set(described["memory"]["partial_offload"]) == keys_of(PartialOffload)
        served = Model.model_validate(described).model_dump_json(exclude_unset=True)
        assert wire(json.loads(served)) == wire(described)  # the JSON does not change on its way through
    ready = next(d for d in descriptions if d["state"] == "ready")
    assert ready["container"] and ready["endpoint"] and ready["memory"]["measured"] == GIB


def test_a_key_the_model_lacks_or_misses_is_refused_at_the_boundary(tmp_path):
    gpus = FakeGpuSession([gpu_reading(0)])

    async def body(session):
        fleet, _, _ = gpu_fleet(tmp_path, ONE_GPU, session, gpus, {"m": 4 * GIB})
        described = fleet.describe(fleet.instances["m"])
        await fleet.shutdown()
        return described

    described = scenario(body, tmp_path)
    with pytest.raises(ValidationError, match="new_key"):
        answer(Model, {**described, "new_key": 1})
    with pytest.raises(ValidationError, match="gave_up"):
        answer(Model, {k: v for k, v in described.items() if k != "gave_up"})
    assert json.loads(answer(Model, described).text) == json.loads(json.dumps(described))


def config_text(tmp_path: Path) -> str:
    """The harness fleet's own config, as a file would say it."""
    return yaml.safe_dump(
        {
            "profile": ONE_GPU.name,
            "models": [{"name": "m", "gguf": str(tmp_path / "m.gguf"), "ttl": 0}],
            "daemon": {
                "instance": "unit",
                "state_dir": str(tmp_path),
                "stop_grace": 0,
                "min_residency": 0,
                "startup_timeout": 5,
            },
        }
    )


def test_the_control_api_serves_what_the_fleet_and_the_rollout_returned(tmp_path):
    gpus = FakeGpuSession([gpu_reading(0)])
    source = str(tmp_path / "config.yaml")

    async def body(session):
        fleet, runtime, bus = gpu_fleet(tmp_path, ONE_GPU, session, gpus, {"m": 4 * GIB})
        every_number_filled(fleet)
        facts = DaemonFacts("unit", ONE_GPU.name, "test", "28.0", ("http://127.0.0.1:8080",), time.time())
        rollout = Rollout(fleet, GenerationStore(tmp_path / "generations"))
        served = {}
        async with test_utils.TestClient(test_utils.TestServer(create_control_app(fleet, facts, rollout, bus))) as c:

            async def call(method: str, path: str, expected: int = 200, **kwargs) -> dict:
                async with c.request(method, path, **kwargs) as response:
                    assert response.status == expected, await response.text()
                    assert response.content_type == "application/json"
                    return await response.json()

            load = load_on_gpu(fleet, runtime, gpus, "m", call("POST", "/models/m/load"))
            served["load"], raw_load = await load, fleet.describe(fleet.instances["m"])
            served["status"], raw_devices, raw_models = await call("GET", "/status"), fleet.devices(), fleet.snapshot()
            served["models"] = await call("GET", "/models")
            served["model"] = await call("GET", "/models/m")
            served["health"] = await call("GET", "/health")
            config = {"config": config_text(tmp_path), "source": source}
            served["validate"] = await call("POST", "/validate", json=config)
            served["apply"] = await call("POST", "/apply", json=config)
            served["rollback"] = await call("POST", "/rollback", json={"generation": 1})
            served["history"], raw_history = await call("GET", "/history"), rollout.store.as_list()
            gpus.drop(runtime.containers[fleet.instances["m"].container_id].pids[0])  # its memory comes back
            served["unload"], raw_unload = await call("POST", "/models/m/unload"), fleet.describe(fleet.instances["m"])
        await fleet.shutdown()
        return served, raw_load, raw_devices, raw_models, raw_history, raw_unload

    served, raw_load, raw_devices, raw_models, raw_history, raw_unload = scenario(body, tmp_path)
    assert wire(served["load"]) == wire(raw_load) and served["load"]["state"] == "ready"
    assert wire(served["status"]["devices"]) == wire(raw_devices)
    assert wire(served["status"]["models"]) == wire(raw_models) == wire(served["models"]["models"])
    assert wire(served["model"]) == wire(raw_models[0])
    assert wire(served["history"]["generations"]) == wire(raw_history)
    assert [g["status"] for g in served["history"]["generations"]] == ["good", "good"]
    assert wire(served["unload"]) == wire(raw_unload) and served["unload"]["state"] == "stopped"
    assert served["status"]["daemon"]["generation"] is None  # read before the apply
    assert served["health"]["status"] == "ok"
    assert served["validate"]["valid"] is True and served["validate"]["plan"]["keep"] == ["m"]
    assert served["apply"] == {
        "generation": 1,
        "source": source,
        "status": "good",
        "plan": {"keep": ["m"], "replace": [], "remove": [], "add": [], "update": []},
    }
    assert served["rollback"]["generation"] == 2 and served["rollback"]["source"] == "rollback to generation 1"
    for name, model in (
        ("load", Model),
        ("status", Status),
        ("models", ModelList),
        ("model", Model),
        ("health", Health),
        ("validate", Preview),
        ("apply", ApplyReport),
        ("rollback", ApplyReport),
        ("history", History),
        ("unload", Model),
    ):
        model.model_validate(served[name])  # each fits the schema the document names for it


def every_error_class() -> list[type[errors.LocalllmError]]:
    found, todo = [], [errors.LocalllmError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


# A value for each constructor argument the hierarchy's classes take: a class with a new one fails here until
# it is named (and its to_json checked against the Error model).
ARGUMENTS = {
    "message": "it went wrong",
    "source": "/etc/localllm/config.yaml",
    "problems": ["config.yaml:3: models[0].gguf: no such file"],
    "name": "nope",
    "known": ["m"],
    "model": "m",
    "reason": "exited",
    "retry_after": 5,
    "report": FAILED_REPORT,
    "needed": "admin",
    "path": "/models/m.gguf",
    "code": "conflict",
}


def test_every_error_of_the_hierarchy_fits_the_error_model():
    classes = every_error_class()
    assert errors.ApplyFailed in classes and errors.Forbidden in classes and errors.UnknownModel in classes
    for cls in classes:
        needed = [p for p in list(inspect.signature(cls).parameters.values()) if p.default is inspect.Parameter.empty]
        error = cls(*[ARGUMENTS[p.name] for p in needed])
        body = json.loads(json.dumps(error.to_json()))
        parsed = Error.model_validate(body)
        assert parsed.error.code == error.code and error.code in errors.error_codes(), cls  # in the schema's enum
        assert wire(parsed.model_dump(mode="json", exclude_unset=True)) == wire(body), cls
    assert Error.model_validate(errors.Forbidden("no", "admin").to_json()).error.needed_role is Role.ADMIN
    assert Error.model_validate(errors.ApplyFailed("failed", FAILED_REPORT).to_json()).report.status == "failed"


def test_the_web_layers_own_errors_fit_the_error_model(tmp_path):
    gpus = FakeGpuSession([gpu_reading(0)])

    async def body(session):
        fleet, _, bus = gpu_fleet(tmp_path, ONE_GPU, session, gpus, {"m": 4 * GIB})
        facts = DaemonFacts("unit", ONE_GPU.name, "test", "28.0", (), time.time())
        rollout = Rollout(fleet, GenerationStore(tmp_path / "generations"))
        app = create_control_app(fleet, facts, rollout, bus, gate=Gate(Role.VIEWER))
        answers = []
        async with test_utils.TestClient(test_utils.TestServer(app)) as client:
            for method, path, kwargs in (
                ("GET", "/no-such-route", {}),
                ("DELETE", "/status", {}),
                ("GET", "/models/nope", {}),
                ("POST", "/validate", {"data": b"[1]"}),
                ("GET", "/events?limit=x", {}),
                ("POST", "/apply", {"json": {}}),
            ):
                async with client.request(method, path, **kwargs) as response:
                    answers.append((response.status, await response.json()))
        await fleet.shutdown()
        return answers

    answers = scenario(body, tmp_path)
    assert [(status, body["error"]["code"]) for status, body in answers] == [
        (404, "not_found"),
        (405, "method_not_allowed"),
        (404, "model_not_found"),
        (400, "bad_request"),
        (400, "bad_request"),
        (403, "forbidden"),
    ]
    for _, body in answers:
        Error.model_validate(body)


def test_the_backends_are_the_configs():
    assert typing.get_args(Model.model_fields["backend"].annotation) == typing.get_args(
        ModelEntry.model_fields["backend"].annotation
    )
