"""Metrics: a real Fleet (no Docker is touched) and a real EventBus, read back through the text format."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request
from prometheus_client.parser import text_string_to_metric_families

from supervisor import __version__
from supervisor.api.metrics import Metrics
from supervisor.config.profiles import load_profiles
from supervisor.config.settings import Config, ModelEntry
from supervisor.core.estimate import LaunchSettings
from supervisor.core.placement import Device
from supervisor.core.slots import Phase
from supervisor.core.stop_cause import StopCause
from supervisor.fleet.events import EventBus, EventKind
from supervisor.fleet.owner import Fleet
from supervisor.fleet.rollout import ApplyStep
from supervisor.fleet.sizing import Sizing
from supervisor.state.generations import GenerationStatus

GIB = 1024**3
NEEDS = {"alpha": 4 * GIB, "beta": 6 * GIB, "gamma": 1 * GIB}
CHAT = "/v1/chat/completions"


def catalog(*names: str) -> tuple[Config, dict[str, Sizing]]:
    entries = [ModelEntry(name=n, aliases=[n[0]], gguf=Path(f"/nonexistent/{n}.gguf")) for n in names]
    return Config(models=entries), {
        n: Sizing(LaunchSettings(context=4096), None, None, None, "test", NEEDS[n]) for n in names
    }


@pytest.fixture
def bus():
    return EventBus()


@pytest.fixture
def fleet(bus):
    config, sizings = catalog("alpha", "beta")
    return Fleet(config, load_profiles()["gpu-2x24g"], runtime=None, session=None, sizings=sizings, events=bus)


@pytest.fixture
def metrics(fleet, bus):
    metrics = Metrics(fleet)
    metrics.listen(bus)
    return metrics


def scrape(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    body, content_type = metrics.render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return scrape(metrics).get((name, frozenset(labels.items())))


def names_with(metrics: Metrics, name: str, label: str) -> set[str]:
    return {dict(labels)[label] for n, labels in scrape(metrics) if n == name}


def test_state_gauge_follows_the_slot_phase(metrics, fleet):
    def states(model):
        return {s: value(metrics, "localllm_model_state", model=model, state=s) for s in map(str, Phase)}

    assert states("alpha") == {"stopped": 1, "starting": 0, "ready": 0, "stopping": 0, "failed": 0}
    assert fleet.scheduler.adopt("alpha", "gpu0", 0.0)
    assert states("alpha") == {"stopped": 0, "starting": 0, "ready": 1, "stopping": 0, "failed": 0}
    fleet.scheduler.slots["alpha"].phase = Phase.FAILED
    assert states("alpha") == {"stopped": 0, "starting": 0, "ready": 0, "stopping": 0, "failed": 1}
    assert states("beta")["stopped"] == 1


def test_load_events_fill_the_counter_and_the_histogram(metrics, bus):
    bus.publish("load", "ready in 2.00s", "alpha", seconds=2.0, container="abc")
    bus.publish("load", "ready in 30.00s", "alpha", seconds=30.0, container="def")
    bus.publish("load_failed", "boom", "alpha", error="boom")
    assert value(metrics, "localllm_model_loads_total", model="alpha", outcome="ok") == 2
    assert value(metrics, "localllm_model_loads_total", model="alpha", outcome="failed") == 1
    assert value(metrics, "localllm_model_load_duration_seconds_count", model="alpha") == 2
    assert value(metrics, "localllm_model_load_duration_seconds_sum", model="alpha") == 32.0
    assert value(metrics, "localllm_model_load_duration_seconds_bucket", model="alpha", le="2.5") == 1
    assert value(metrics, "localllm_model_load_duration_seconds_bucket", model="alpha", le="60.0") == 2
    assert value(metrics, "localllm_model_load_duration_seconds_bucket", model="alpha", le="600.0") == 2
    assert value(metrics, "localllm_model_loads_total", model="beta", outcome="ok") is None


def test_lifecycle_events_are_counted_per_model(metrics, bus):
    bus.publish("evict", "evicted", "alpha", reason="evicted", cause="evict")
    bus.publish("crash", "died", "beta", reason="died", cause="crash")
    bus.publish("crash", "died", "beta", reason="died", cause="crash")
    bus.publish("restart", "again", "beta", failures=2)
    bus.publish("health_failure", "probe failed", "beta", failures=1, seen="HTTP 503")
    bus.publish("unload", "idle", "alpha", reason="idle for 300s", cause="idle")
    bus.publish("unload", "operator", "alpha", reason="asked", cause="unload")
    bus.publish("unload", "operator", "alpha", reason="asked", cause="unload")
    bus.publish("state", "stopped -> starting", "alpha", **{"from": "stopped", "to": "starting"})
    assert value(metrics, "localllm_model_evictions_total", model="alpha") == 1
    assert value(metrics, "localllm_model_evictions_total", model="beta") is None
    assert value(metrics, "localllm_model_crashes_total", model="beta") == 2
    assert value(metrics, "localllm_model_restarts_total", model="beta") == 1
    assert value(metrics, "localllm_model_health_failures_total", model="beta") == 1
    assert value(metrics, "localllm_model_unloads_total", model="alpha", cause="idle") == 1
    assert value(metrics, "localllm_model_unloads_total", model="alpha", cause="unload") == 2


def test_config_applies_and_rollbacks(metrics, bus):
    assert value(metrics, "localllm_config_applies_total", status="good") == 0  # present before the first apply
    for status in ("applying", "launching", "healthy", "good", "good", "failed", "invalid", "invalid"):
        bus.publish("apply", f"generation 3: {status}", generation=3, status=status)
    bus.publish("rollback", "rolling back to generation 2", generation=2)
    assert value(metrics, "localllm_config_applies_total", status="good") == 2
    assert value(metrics, "localllm_config_applies_total", status="failed") == 1
    assert value(metrics, "localllm_config_applies_total", status="invalid") == 2
    assert names_with(metrics, "localllm_config_applies_total", "status") == {"good", "failed", "invalid"}
    assert value(metrics, "localllm_rollbacks_total", trigger="operator") == 1
    assert value(metrics, "localllm_rollbacks_total", trigger="revert") == 1


def test_events_published_with_enum_members_are_counted_and_labelled_as_with_strings(metrics, bus):
    bus.publish(EventKind.UNLOAD, "idle", "alpha", reason="idle for 300s", cause=StopCause.IDLE)
    bus.publish(EventKind.UNLOAD, "gone", "alpha", reason="Ollama evicted it", cause=StopCause.SERVER)
    bus.publish(EventKind.EVICT, "evicted", "alpha", reason="evicted", cause=StopCause.EVICT)
    for status in (ApplyStep.APPLYING, GenerationStatus.GOOD, GenerationStatus.FAILED):
        bus.publish(EventKind.APPLY, f"generation 3: {status}", generation=3, status=status)
    assert value(metrics, "localllm_model_unloads_total", model="alpha", cause="idle") == 1
    assert value(metrics, "localllm_model_unloads_total", model="alpha", cause="other") == 1
    assert value(metrics, "localllm_model_evictions_total", model="alpha") == 1
    assert value(metrics, "localllm_config_applies_total", status="good") == 1
    assert value(metrics, "localllm_rollbacks_total", trigger="revert") == 1
    assert names_with(metrics, "localllm_config_applies_total", "status") == {"good", "failed", "invalid"}


def test_requests_are_counted_and_timed(metrics):
    metrics.observe_request("alpha", CHAT, 200, 0.003)
    metrics.observe_request("alpha", CHAT, 200, 0.7)
    metrics.observe_request("alpha", CHAT, 503, 1.3)
    metrics.observe_request("beta", "/v1/embeddings", 200, 0.02)
    assert value(metrics, "localllm_requests_total", model="alpha", endpoint=CHAT, code="200") == 2
    assert value(metrics, "localllm_requests_total", model="alpha", endpoint=CHAT, code="503") == 1
    assert value(metrics, "localllm_requests_total", model="beta", endpoint="/v1/embeddings", code="200") == 1
    assert value(metrics, "localllm_request_duration_seconds_count", model="alpha", endpoint=CHAT) == 3
    assert value(metrics, "localllm_request_duration_seconds_sum", model="alpha", endpoint=CHAT) == pytest.approx(2.003)
    assert value(metrics, "localllm_request_duration_seconds_bucket", model="alpha", endpoint=CHAT, le="0.005") == 1
    assert value(metrics, "localllm_request_duration_seconds_bucket", model="alpha", endpoint=CHAT, le="1.0") == 2
    assert value(metrics, "localllm_request_duration_seconds_bucket", model="alpha", endpoint=CHAT, le="600.0") == 3


def test_names_outside_the_catalog_share_one_label(metrics, bus):
    for name in ("ghost", "spectre", "a"):  # an alias too: callers pass catalog names
        metrics.observe_request(name, CHAT, 404, 0.001)
    bus.publish("crash", "died", "ghost", reason="died", cause="crash")
    bus.publish("crash", "died", None, reason="died", cause="crash")
    assert names_with(metrics, "localllm_requests_total", "model") == {"_unknown"}
    assert value(metrics, "localllm_requests_total", model="_unknown", endpoint=CHAT, code="404") == 3
    assert value(metrics, "localllm_model_crashes_total", model="_unknown") == 2


def test_in_flight_and_queue_depth_are_read_from_the_scheduler(metrics, fleet):
    scheduler = fleet.scheduler
    assert scheduler.adopt("alpha", "gpu0", 0.0)
    scheduler.submit("alpha", 1.0)
    scheduler.submit("alpha", 1.0)
    scheduler.slots["beta"].held = True  # a config change holds it: requests wait
    for _ in range(3):
        scheduler.submit("beta", 1.0)
    assert value(metrics, "localllm_requests_in_flight", model="alpha") == 2
    assert value(metrics, "localllm_requests_in_flight", model="beta") == 0
    assert value(metrics, "localllm_queue_depth", model="alpha") == 0
    assert value(metrics, "localllm_queue_depth", model="beta") == 3
    scheduler.finished("alpha", 2.0)
    assert value(metrics, "localllm_requests_in_flight", model="alpha") == 1


def test_device_gauges_sum_the_models_on_each_device(metrics, fleet):
    budget = 23 * GIB  # 24 GiB minus the profile's 1 GiB reserve
    assert value(metrics, "localllm_device_budget_bytes", device="gpu0") == budget
    assert value(metrics, "localllm_device_estimated_bytes", device="gpu0") == 0
    assert fleet.scheduler.adopt("alpha", "gpu0", 0.0)
    assert fleet.scheduler.adopt("beta", "gpu0", 0.0)
    fleet.instances["alpha"].measured = 5 * GIB
    assert value(metrics, "localllm_device_budget_bytes", device="gpu1") == budget
    assert value(metrics, "localllm_device_estimated_bytes", device="gpu0") == 10 * GIB
    assert value(metrics, "localllm_device_estimated_bytes", device="gpu1") == 0
    assert value(metrics, "localllm_device_measured_bytes", device="gpu0") == 5 * GIB
    assert value(metrics, "localllm_device_measured_bytes", device="gpu1") is None  # nothing measured there
    fleet.instances["beta"].measured = 7 * GIB
    assert value(metrics, "localllm_device_measured_bytes", device="gpu0") == 12 * GIB
    fleet.scheduler.slots["beta"].phase = Phase.STARTING  # started again: its old measurement is stale
    assert value(metrics, "localllm_device_estimated_bytes", device="gpu0") == 10 * GIB
    assert value(metrics, "localllm_device_measured_bytes", device="gpu0") == 5 * GIB
    fleet.scheduler.slots["beta"].phase, fleet.scheduler.slots["beta"].device = Phase.STOPPED, None
    assert value(metrics, "localllm_device_estimated_bytes", device="gpu0") == 4 * GIB
    assert value(metrics, "localllm_device_measured_bytes", device="gpu0") == 5 * GIB


def test_a_new_catalog_is_read_at_scrape_time_and_counters_survive(metrics, fleet, bus):
    bus.publish("crash", "died", "alpha", reason="died", cause="crash")
    config, sizings = catalog("alpha", "gamma")
    assert fleet.switching.commit(config, sizings, {}) == []
    bus.publish("crash", "died", "alpha", reason="died", cause="crash")
    bus.publish("crash", "died", "beta", reason="died", cause="crash")  # gone from the catalog
    metrics.observe_request("gamma", CHAT, 200, 0.1)
    assert names_with(metrics, "localllm_model_state", "model") == {"alpha", "gamma"}
    assert value(metrics, "localllm_model_crashes_total", model="alpha") == 2
    assert value(metrics, "localllm_model_crashes_total", model="_unknown") == 1
    assert value(metrics, "localllm_requests_total", model="gamma", endpoint=CHAT, code="200") == 1
    assert value(metrics, "localllm_queue_depth", model="gamma") == 0


@pytest.mark.parametrize(
    "kind, data",
    [
        ("load", {}),
        ("load", {"seconds": "soon"}),
        ("load", {"seconds": None}),
        ("unload", {}),
        ("unload", {"cause": ["not", "hashable"]}),
        ("apply", {}),
        ("apply", {"status": {"nested": 1}}),
        ("something_new", {"x": 1}),
    ],
)
def test_a_malformed_event_never_raises(metrics, bus, kind, data):
    bus.publish(kind, "odd", "alpha", **data)  # the listener runs inside publish
    metrics.on_event(bus.recent()[-1])
    bus.publish("load", "ready", "alpha", seconds=1.0)  # and counting goes on
    assert value(metrics, "localllm_model_load_duration_seconds_count", model="alpha") == 1


def test_a_load_without_seconds_is_counted_but_not_timed(metrics, bus):
    bus.publish("load", "ready", "alpha", container="abc")
    assert value(metrics, "localllm_model_loads_total", model="alpha", outcome="ok") == 1
    assert value(metrics, "localllm_model_load_duration_seconds_count", model="alpha") == 0


def test_build_info_and_a_registry_of_its_own(fleet):
    first, second = Metrics(fleet), Metrics(fleet)  # the global registry would refuse the second
    assert value(first, "localllm_build_info", version=__version__) == 1
    assert first.registry is not second.registry


def test_handler_serves_the_rendered_text(metrics, bus):
    bus.publish("evict", "evicted", "beta", reason="evicted", cause="evict")
    response = asyncio.run(metrics.handler(make_mocked_request("GET", "/metrics")))
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert b'localllm_model_evictions_total{model="beta"} 1.0' in response.body


def test_an_unusable_device_reads_zero_on_the_usable_gauge(metrics, fleet):
    assert value(metrics, "localllm_device_usable", device="gpu0") == 1
    fleet.scheduler.devices = [
        Device("gpu0", 0, 0, 0, "GPU-a", "memory info failed: NVML_ERROR_GPU_IS_LOST"),
        fleet.scheduler.devices[1],
    ]
    assert value(metrics, "localllm_device_usable", device="gpu0") == 0
    assert value(metrics, "localllm_device_usable", device="gpu1") == 1
