"""Pure placement decisions. No I/O, no logging: data in, decision out."""

from __future__ import annotations

from collections.abc import Iterable, Set


def free_ports(port_range: tuple[int, int], taken: Set[int]) -> Iterable[int]:
    """Ports of the range not already given to one of our containers, lowest first."""
    low, high = port_range
    return (port for port in range(low, high + 1) if port not in taken)
