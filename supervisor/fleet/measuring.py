"""What the models were seen to use, and the need the scheduler admits them with.

Readings come from the hostings (NVML per container, or what a shared server reports). Each
run's peak is kept; on a GPU host ``GpuMeter`` learns from it (at once when higher, lower only
after several runs). A model whose server sizes it (Ollama) is admitted with what the server
reported, which beats the placeholder; a declared ``memory`` always wins.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from supervisor.fleet.instance import Instance
    from supervisor.fleet.owner import Fleet


class Measuring:
    def __init__(self, fleet: Fleet):
        self.fleet = fleet

    def observe(self, instance: Instance, used: int) -> None:
        """A reading of what ``instance`` uses: its run's peak, and learned at once when higher."""
        fleet = self.fleet
        instance.measured = used
        if used <= (instance.peak or 0):
            return
        instance.peak = used
        learned = fleet.meter.learn(instance, used) if fleet.meter is not None else None
        if learned is not None:
            self._learned(instance, learned)
        elif fleet.hosting_of(instance.entry).sizes_itself and not instance.entry.memory:
            self.set_need(instance.name, used)  # what its server reports beats the placeholder

    def set_need(self, name: str, measured: int) -> None:
        """What the model was seen to need; it did run, so never more than the largest budget."""
        scheduler = self.fleet.scheduler
        scheduler.set_need(name, min(measured, max(d.budget for d in scheduler.devices)))

    def finish_run(self, instance: Instance) -> None:
        """A model stops: its run's peak counts towards learning (a lower size only after several such runs)."""
        meter = self.fleet.meter
        peak, served = instance.peak, instance.served
        instance.peak, instance.served, instance.offload = None, 0, None
        learned = meter.finish_run(instance, peak, served) if meter is not None else None
        if learned is not None:
            self._learned(instance, learned)

    def _learned(self, instance: Instance, learned: int) -> None:
        if instance.sizing.learned != learned:
            instance.sizing = replace(instance.sizing, learned=learned)
        if instance.entry.memory:
            return  # declared: what was learned is shown, not used
        # The placeholder of a model whose server sizes it stands only until the server reports its size.
        sized_by_server = self.fleet.hosting_of(instance.entry).sizes_itself
        self.set_need(instance.name, learned if sized_by_server else instance.sizing.need)
