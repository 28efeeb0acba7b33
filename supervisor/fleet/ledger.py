"""Which containers are whose beyond the models' own: requests in flight on each, launches, protected ones.

The fleet keeps one ``ContainerLedger``. The proxy counts its requests on the container it
reaches (``upstream``), so that a retired container drains before it goes; a config change
registers the endpoint it is launching and protects what it started or retires, so that no
sweep removes them meanwhile.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from supervisor.core.containers import Endpoint


class ContainerLedger:
    def __init__(self) -> None:
        self._users: Counter[str] = Counter()  # requests in flight per container id
        self._launching: set[Endpoint] = set()  # endpoints of containers a config change is starting
        self._protected: set[str] = set()  # containers a config change launched or retires: never swept

    @contextlib.contextmanager
    def upstream(self, container_id: str) -> Iterator[None]:
        """One request on ``container_id`` for the duration of the block."""
        self._users[container_id] += 1
        try:
            yield
        finally:
            self._users[container_id] -= 1

    def in_flight_on(self, container_id: str) -> int:
        return self._users[container_id]

    @contextlib.contextmanager
    def launching(self, endpoint: Endpoint) -> Iterator[None]:
        """While a config change starts a container at ``endpoint``: its socket is in use, no sweep takes it."""
        self._launching.add(endpoint)
        try:
            yield
        finally:
            self._launching.discard(endpoint)

    def launching_sockets(self) -> set[str]:
        return {e.socket for e in self._launching if e.socket}

    def protect(self, container_id: str) -> None:
        self._protected.add(container_id)

    def unprotect(self, container_id: str) -> None:
        self._protected.discard(container_id)

    def retired(self, container_id: str) -> None:
        """A retired container is gone: no more counting of its requests, no more protection."""
        self._users.pop(container_id, None)
        self._protected.discard(container_id)

    def protected(self) -> set[str]:
        return set(self._protected)

    def forget_protected(self) -> None:
        """At shutdown everything of ours goes."""
        self._protected.clear()
