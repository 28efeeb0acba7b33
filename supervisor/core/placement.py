"""Pure placement decisions: where a model fits, and what to evict so it does.

No I/O, no logging, no clock: data in, decision out, and every decision says
why in words. The scheduler calls ``plan_admission``; property tests check it
never overfills a device and never evicts a busy, pinned or loading model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from supervisor.config.profiles import Profile

MIB = 1024**2


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    uuid: str = ""  # "GPU-..." from NVML or nvidia-smi; "" when unknown
    reserved_bytes: int = 0  # driver-reserved memory (NVML memory info v2); 0 when unknown
    problem: str | None = None  # the device cannot be used, and why (its memory fields are then 0)


@dataclass(frozen=True)
class Device:
    """Memory models may use on one device: a GPU (``gpu0``...) or host memory (``cpu``)."""

    id: str
    budget: int  # declared or measured total, minus the profile's reserve
    measured_free: int | None = None  # measured free memory minus the reserve, when a GPU reading exists
    index: int | None = None  # GPU index (NVML's order)
    uuid: str | None = None  # GPU UUID for the container's device request, when NVML gave one
    problem: str | None = None  # the device cannot be used (an NVML error, MIG): why; its budget is 0

    @property
    def gpu_request(self) -> str | None:
        """How a container asks Docker for this GPU: its UUID (stable across reboots and driver
        renumbering), else its index; None for host memory."""
        if self.id == "cpu":
            return None
        return self.uuid or (str(self.index) if self.index is not None else None)


@dataclass(frozen=True)
class Resident:
    """A model holding (or about to hold) memory on a device."""

    name: str
    device: str
    bytes: int
    in_flight: int = 0
    pinned: bool = False
    busy_changing: bool = False  # starting or stopping: counted, never evicted
    last_used: float = 0.0
    loaded_at: float = 0.0
    ttl: float | None = None  # idle seconds before it may be unloaded; None: never


@dataclass(frozen=True)
class Admit:
    device: str
    evict: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Wait:
    reason: str
    blockers: tuple[str, ...] = ()  # busy models whose eviction would make room once idle


@dataclass(frozen=True)
class Refuse:
    reason: str


Decision = Admit | Wait | Refuse


def devices_for(profile: Profile, readings: list[GpuReading] | None) -> list[Device]:
    """Budgets per device: measured GPU totals when readable, else the profile's; minus the reserve.

    A measured budget also leaves out what the driver reserves (NVML memory info v2): that memory is
    never free for a model. A GPU whose reading failed (lost, not supported, MIG) gets no budget and
    carries the reason. With no GPU in the profile, models run from host memory: one ``cpu`` device
    with the profile's RAM minus its RAM reserve.
    """
    gib = 1024**3
    if not profile.has_gpus:
        budget = int((profile.hardware.ram_gib - profile.defaults.ram_reserve_gib) * gib)
        return [Device("cpu", max(0, budget))]
    reserve = int(profile.defaults.vram_reserve_gib * gib)
    if readings:
        return [
            Device(f"gpu{r.index}", 0, 0, r.index, r.uuid or None, r.problem)
            if r.problem
            else Device(
                f"gpu{r.index}",
                max(0, r.total_bytes - r.reserved_bytes - reserve),
                max(0, r.free_bytes - reserve),
                r.index,
                r.uuid or None,
            )
            for r in readings
        ]
    return [
        Device(f"gpu{i}", max(0, int(g.vram_gib * gib) - reserve), None, i) for i, g in enumerate(profile.hardware.gpus)
    ]


def free_on(device: Device, residents: Sequence[Resident]) -> int:
    """Free bytes: the smaller of what our accounting leaves and what was measured."""
    accounted = device.budget - sum(r.bytes for r in residents if r.device == device.id)
    return accounted if device.measured_free is None else min(accounted, device.measured_free)


def expired(resident: Resident, now: float) -> bool:
    return resident.ttl is not None and now - resident.last_used >= resident.ttl


def plan_admission(
    name: str, need: int, devices: Sequence[Device], residents: Sequence[Resident], now: float, min_residency: float
) -> Decision:
    """Where ``name`` (needing ``need`` bytes) goes now, what must go first, or why it must wait or cannot run."""
    if not devices:
        return Refuse(f"no device to place '{name}' on: the devices it may use are not on this host")
    usable = [d for d in devices if d.problem is None]
    if not usable:
        unusable = "; ".join(f"{d.id}: {d.problem}" for d in devices)
        return Refuse(f"no usable device to place '{name}' on ({unusable})")
    devices = usable
    others = [r for r in residents if r.name != name]
    largest = max(devices, key=lambda d: d.budget)
    if need > largest.budget:
        return Refuse(
            f"'{name}' needs {_mib(need)} but the largest device budget is {_mib(largest.budget)} "
            f"({largest.id}); lower its context_size, or set gpu_layers for partial offload"
        )
    pinned_room = {d.id: d.budget - sum(r.bytes for r in others if r.device == d.id and r.pinned) for d in devices}
    if all(need > room for room in pinned_room.values()):
        return Refuse(
            f"'{name}' needs {_mib(need)} but pinned models leave at most "
            f"{_mib(max(pinned_room.values()))} on any device"
        )
    hopeless = [d for d in devices if _never_fits(d, need, others, pinned_room[d.id])]
    if len(hopeless) == len(devices):
        return Refuse(
            f"'{name}' needs {_mib(need)}, more than any device can give: "
            + "; ".join(_room_in_words(d, others, pinned_room[d.id]) for d in devices)
        )

    fitting = [(free_on(d, others) - need, d.id) for d in devices if need <= free_on(d, others)]
    if fitting:
        spare, device_id = min(fitting)
        return Admit(device_id, (), f"'{name}' ({_mib(need)}) fits on {device_id} with {_mib(spare)} to spare")

    options = []
    blocked: dict[str, str] = {}
    blockers: set[str] = set()
    for device in devices:
        shortfall = need - free_on(device, others)
        on_device = [r for r in others if r.device == device.id]
        chosen = _covering_evictions(on_device, shortfall, now, min_residency)
        if chosen is not None:
            options.append((len(chosen), sum(r.bytes for r in chosen), device.id, chosen))
        could_help = sum(r.bytes for r in on_device if not r.pinned and not r.busy_changing) >= shortfall
        for r in on_device:
            why = _why_not_evictable(r, now, min_residency)
            if why:
                blocked[r.name] = why
                if could_help and r.in_flight:  # drain only where evicting it could make room
                    blockers.add(r.name)
    if options:
        _, freed, device_id, chosen = min(options, key=lambda o: o[:3])
        names = tuple(r.name for r in chosen)
        details = ", ".join(
            f"{r.name} ({_mib(r.bytes)}, {'ttl expired' if expired(r, now) else 'idle'} {now - r.last_used:.0f}s)"
            for r in chosen
        )
        return Admit(device_id, names, f"'{name}' ({_mib(need)}) goes on {device_id} after evicting {details}")
    reasons = "; ".join(f"{n}: {why}" for n, why in sorted(blocked.items())) or "nothing can be evicted"
    return Wait(f"'{name}' ({_mib(need)}) waits for room: {reasons}", tuple(sorted(blockers)))


def _never_fits(device: Device, need: int, others: Sequence[Resident], pinned_room: int) -> bool:
    """No eviction of ours can make room: pinned models leave too little, or none of our models holds
    memory on the device and what is measured free there is too little (the driver or other processes
    hold the rest, and waiting for them would be waiting for nothing)."""
    if need > pinned_room:
        return True
    ours = any(r.device == device.id for r in others)
    return not ours and device.measured_free is not None and need > min(device.budget, device.measured_free)


def _room_in_words(device: Device, others: Sequence[Resident], pinned_room: int) -> str:
    if pinned_room < device.budget:
        return f"{device.id} has {_mib(pinned_room)} beside pinned models"
    if device.measured_free is not None and not any(r.device == device.id for r in others):
        return (
            f"{device.id} has {_mib(device.measured_free)} free of its {_mib(device.budget)} budget "
            "with none of our models on it (the driver or other processes use the rest)"
        )
    return f"{device.id} has a budget of {_mib(device.budget)}"


def eviction_order(candidates: Iterable[Resident], now: float) -> list[Resident]:
    """TTL-expired first, then least recently used; the name breaks ties so the order is stable."""
    return sorted(candidates, key=lambda r: (not expired(r, now), r.last_used, r.name))


def _why_not_evictable(r: Resident, now: float, min_residency: float) -> str | None:
    if r.pinned:
        return "pinned"
    if r.busy_changing:
        return "starting or stopping"
    if r.in_flight:
        return f"serving {r.in_flight} request(s)"
    if now - r.loaded_at < min_residency:
        return f"loaded {now - r.loaded_at:.0f}s ago (min_residency {min_residency:g}s)"
    return None


def _covering_evictions(
    on_device: list[Resident], shortfall: int, now: float, min_residency: float
) -> list[Resident] | None:
    """The smallest set, taken in eviction order, whose bytes cover ``shortfall``; None if none does."""
    evictable = eviction_order((r for r in on_device if _why_not_evictable(r, now, min_residency) is None), now)
    chosen: list[Resident] = []
    for r in evictable:
        if sum(c.bytes for c in chosen) >= shortfall:
            break
        chosen.append(r)
    if sum(c.bytes for c in chosen) < shortfall:
        return None
    for r in reversed(list(chosen)):  # drop what is not needed, most recently used first
        if sum(c.bytes for c in chosen if c is not r) >= shortfall:
            chosen.remove(r)
    return chosen


def _mib(value: int) -> str:
    return f"{value / MIB:.1f} MiB"
