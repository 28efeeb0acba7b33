"""Prometheus metrics: counters fed by the event bus and the proxy, gauges read from the fleet at scrape time.

Everything lives in a registry of its own (never prometheus_client's global
one). Models are labelled by catalog name, so a model's counters survive
config changes; a name not in the catalog at the time is counted as
``_unknown``, so no caller can blow up the label set. The live gauges
(states, requests in flight, queues, device memory) are read from
``fleet.instances`` and ``fleet.scheduler`` on every scrape, since a new
config replaces them. Scrapes run on the event loop, like every other reader
of the fleet.
"""

from __future__ import annotations

from aiohttp import web
from loguru import logger
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from supervisor import __version__
from supervisor.core.slots import Phase
from supervisor.core.stop_cause import StopCause
from supervisor.fleet.events import Event, EventBus, EventKind
from supervisor.fleet.owner import Fleet
from supervisor.state.generations import GenerationStatus

UNKNOWN = "_unknown"  # catalog names start with a letter or digit, so this one never clashes
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# an apply's final statuses (the others are its progress, rollout.ApplyStep)
APPLY_RESULTS = (GenerationStatus.GOOD, GenerationStatus.FAILED, GenerationStatus.INVALID)
UNLOAD_CAUSES = (StopCause.UNLOAD, StopCause.IDLE)  # evictions and crashes have events of their own
PER_MODEL_EVENTS = {
    EventKind.EVICT: ("evictions", "Models stopped to make room for another (swaps)"),
    EventKind.RESTART: ("restarts", "Models started again after a failure"),
    EventKind.CRASH: ("crashes", "Models whose server died or hung while serving"),
    EventKind.HEALTH_FAILURE: ("health_failures", "Failed liveness probes"),
}


class Metrics:
    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.registry = r = CollectorRegistry()
        self.loads = Counter("localllm_model_loads", "Model starts, by outcome", ["model", "outcome"], registry=r)
        self.load_seconds = Histogram(
            "localllm_model_load_duration_seconds",
            "Time from start to ready (container creation and readiness gate)",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.per_model = {
            kind: Counter(f"localllm_model_{name}", text, ["model"], registry=r)
            for kind, (name, text) in PER_MODEL_EVENTS.items()
        }
        self.unloads = Counter(
            "localllm_model_unloads",
            "Models stopped when idle (cause=idle) or by an operator or a config change (cause=unload)",
            ["model", "cause"],
            registry=r,
        )
        self.rollbacks = Counter(
            "localllm_rollbacks",
            "Config rollbacks: asked for by an operator, or a failed config reverted to last-good",
            ["trigger"],
            registry=r,
        )
        self.applies = Counter(
            "localllm_config_applies", "Config generations applied, by result", ["status"], registry=r
        )
        self.requests = Counter(
            "localllm_requests", "Proxied requests, by HTTP status code", ["model", "endpoint", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "localllm_request_duration_seconds",
            "Proxied request duration, including waiting for the model",
            ["model", "endpoint"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        Gauge("localllm_build_info", "localllm's version", ["version"], registry=r).labels(__version__).set(1)
        for trigger in ("operator", "revert"):
            self.rollbacks.labels(trigger)
        for status in APPLY_RESULTS:
            self.applies.labels(status)
        r.register(self)  # collect() below: the gauges read at scrape time

    def listen(self, bus: EventBus) -> None:
        bus.listen(self.on_event)

    def on_event(self, event: Event) -> None:
        """Count one event; it is called inside ``publish``, so it never raises."""
        try:
            self._count(event)
        except Exception:
            logger.opt(exception=True).warning("metrics could not count event {!r}", event)

    def _count(self, event: Event) -> None:
        model, data = self._model(event.model), event.data
        if event.kind == EventKind.LOAD:
            self.loads.labels(model, "ok").inc()
            self.load_seconds.labels(model).observe(float(data["seconds"]))
        elif event.kind == EventKind.LOAD_FAILED:
            self.loads.labels(model, "failed").inc()
        elif event.kind in self.per_model:
            self.per_model[event.kind].labels(model).inc()
        elif event.kind == EventKind.UNLOAD:
            cause = data.get("cause")
            self.unloads.labels(model, cause if cause in UNLOAD_CAUSES else "other").inc()
        elif event.kind == EventKind.ROLLBACK:
            self.rollbacks.labels("operator").inc()
        elif event.kind == EventKind.APPLY and data.get("status") in APPLY_RESULTS:
            self.applies.labels(data["status"]).inc()
            if data["status"] == GenerationStatus.FAILED:
                self.rollbacks.labels("revert").inc()

    def observe_request(self, model: str, endpoint: str, status: int, seconds: float) -> None:
        model = self._model(model)
        self.requests.labels(model, endpoint, str(status)).inc()
        self.request_seconds.labels(model, endpoint).observe(seconds)

    def _model(self, name: str | None) -> str:
        return name if name is not None and name in self.fleet.instances else UNKNOWN

    def collect(self):
        """The live gauges, read from the fleet as it is now."""
        scheduler = self.fleet.scheduler
        state = GaugeMetricFamily(
            "localllm_model_state", "1 for the model's current state, 0 for the others", labels=["model", "state"]
        )
        in_flight = GaugeMetricFamily("localllm_requests_in_flight", "Requests being served", labels=["model"])
        queued = GaugeMetricFamily("localllm_queue_depth", "Requests waiting for the model", labels=["model"])
        views = scheduler.views()
        for name, slot in views.items():
            for phase in Phase:
                state.add_metric([name, str(phase)], 1 if slot.phase is phase else 0)
            in_flight.add_metric([name], slot.in_flight)
            queued.add_metric([name], slot.waiting)
        budget = GaugeMetricFamily(
            "localllm_device_budget_bytes", "Memory models may use on the device", labels=["device"]
        )
        estimated = GaugeMetricFamily(
            "localllm_device_estimated_bytes",
            "Estimated need of the models holding "
            "memory on the device (starting, ready or stopping), and of room held for "
            "containers a config change starts",
            labels=["device"],
        )
        measured = GaugeMetricFamily(
            "localllm_device_measured_bytes",
            "Measured GPU memory of the ready or stopping models on the device; absent when none was measured",
            labels=["device"],
        )
        usable = GaugeMetricFamily(
            "localllm_device_usable",
            "1 while the device can be used; 0 when its NVML "
            "queries fail or it is in MIG mode (the reason is in /status and the log)",
            labels=["device"],
        )
        residents = scheduler.residents()
        for device in scheduler.devices:
            budget.add_metric([device.id], device.budget)
            usable.add_metric([device.id], 0 if device.problem else 1)
            estimated.add_metric([device.id], sum(r.bytes for r in residents if r.device == device.id))
            known = [
                i.measured
                for i in self.fleet.instances.values()
                if i.measured is not None
                and (slot := views.get(i.name)) is not None
                and slot.device == device.id
                and slot.phase in (Phase.READY, Phase.STOPPING)
            ]
            if known:
                measured.add_metric([device.id], sum(known))
        return [state, in_flight, queued, budget, usable, estimated, measured]

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE

    async def handler(self, request: web.Request) -> web.Response:
        body, content_type = self.render()
        return web.Response(body=body, headers={"Content-Type": content_type})
