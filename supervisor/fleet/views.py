"""What the fleet shows of itself: each model's state and sizing, the devices, a status line.

Read-only, from the scheduler's views and the instances: the control API, metrics and
sd_notify's STATUS= all read the fleet through here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from supervisor.core.errors import ModelNotRunning

if TYPE_CHECKING:
    from supervisor.fleet.instance import Instance
    from supervisor.fleet.owner import Fleet


def describe(fleet: Fleet, instance: Instance) -> dict:
    slot = fleet.scheduler.view(instance.name)
    sizing, spec = instance.sizing, instance.spec
    return {
        "name": instance.name,
        "aliases": list(instance.entry.aliases),
        "backend": instance.entry.backend,
        "tag": instance.entry.tag,
        "state": str(slot.phase),
        "device": slot.device,
        "container": instance.container_id[:12] if instance.container_id else None,
        "config_hash": spec.config_hash() if spec else None,
        "port": spec.endpoint.port if spec else None,
        "endpoint": spec.endpoint.label() if spec else None,
        "preload": instance.entry.preload,
        "pinned": instance.entry.pinned,
        "ttl": slot.ttl,
        "in_flight": slot.in_flight,
        "waiting": slot.waiting,
        "last_used": instance.last_used,
        "ready_at": instance.ready_at,
        "load_seconds": instance.load_seconds,
        "memory": {
            "need": slot.need,
            "declared": sizing.declared,
            "ollama_estimate": instance.show_estimate,
            "estimate": sizing.estimate.as_dict() if sizing.estimate else None,
            "estimate_problem": sizing.problem,
            "learned": sizing.learned,
            "measured": instance.measured,
            "peak": instance.peak,
            "partial_offload": (
                {"size_vram": instance.offload[0], "size": instance.offload[1]} if instance.offload else None
            ),
        },
        "error": instance.error,
        "failures": slot.failures,
        "gave_up": slot.gave_up,
    }


def devices(fleet: Fleet) -> list[dict]:
    """Each device's budget, what was measured free, and why it cannot be used (if so)."""
    return [
        {"id": d.id, "uuid": d.uuid, "budget": d.budget, "measured_free": d.measured_free, "problem": d.problem}
        for d in fleet.scheduler.devices
    ]


def status_line(fleet: Fleet) -> str:
    """One line for systemd's STATUS=: how many models are in each state, and who waits."""
    counts = Counter(str(view.phase) for view in fleet.scheduler.views().values())
    parts = [f"{counts[p]} {p}" for p in ("ready", "starting", "stopping", "failed") if counts[p]]
    line = ", ".join(parts) or "no model loaded"
    if fleet.scheduler.waiting():
        line += f"; {fleet.scheduler.waiting()} request(s) waiting"
    return line + (f"; DEGRADED: {fleet.degraded}" if fleet.degraded else "")


async def memory_estimate(fleet: Fleet, name: str) -> dict:
    """What the model needs and where that number comes from; its server may say more (Ollama's /api/show)."""
    instance = fleet.resolve(name)
    sizing, slot = instance.sizing, fleet.scheduler.view(instance.name)
    answer = {
        "model": instance.name,
        "backend": instance.entry.backend,
        "need": slot.need,
        "declared": sizing.declared,
        "learned": sizing.learned,
        "measured": instance.measured,
        "estimate": sizing.estimate.as_dict() if sizing.estimate else None,
        "source": None,
    }
    server_says = await fleet.hosting_of(instance.entry).estimate(instance)
    if server_says is not None:
        answer["show"] = server_says
    answer["source"] = (
        "declared"
        if sizing.declared
        else "measured"
        if instance.measured
        else "learned"
        if sizing.learned
        else "ollama /api/show"
        if instance.show_estimate
        else "gguf header"
        if sizing.estimate
        else "placeholder"
    )
    return answer


def logs(fleet: Fleet, name: str, tail: int, follow: bool) -> AsyncIterator[bytes]:
    """The output of the model's container: ``tail`` lines back, then (``follow``) as it comes."""
    instance = fleet.resolve(name)
    container_id = instance.container_id
    if container_id is None:
        error = f"; its last error: {instance.error}" if instance.error else ""
        raise ModelNotRunning(f"'{instance.name}' has no container ({fleet.phase(instance)}){error}")
    return fleet.runtime.logs_stream(container_id, tail, follow)
