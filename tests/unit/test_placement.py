"""supervisor.placement: choosing ports for containers."""

from __future__ import annotations

import pytest

from supervisor.placement import free_ports


@pytest.mark.parametrize("port_range, taken, expected", [
    ((28100, 28104), set(), [28100, 28101, 28102, 28103, 28104]),
    ((28100, 28104), {28101, 28103}, [28100, 28102, 28104]),
    ((28100, 28104), {28100}, [28101, 28102, 28103, 28104]),
    ((28100, 28102), {28100, 28101, 28102}, []),
    ((28100, 28100), set(), [28100]),
    ((28100, 28100), {28100}, []),
    ((28100, 28102), {9000, 28105}, [28100, 28101, 28102]),
    ((28100, 28102), frozenset({28102}), [28100, 28101]),
])
def test_free_ports_lowest_first(port_range, taken, expected):
    assert list(free_ports(port_range, taken)) == expected


def test_free_ports_is_lazy_over_a_large_range():
    ports = iter(free_ports((1024, 65535), {1024}))
    assert [next(ports), next(ports)] == [1025, 1026]
