"""How the proxy serves a model: request filters, a concurrency limit, what a client sees while it loads.

llama-swap's ``filters`` and ``concurrencyLimit`` carried over: ``filters.strip_params`` removes
request fields a model's template rejects (``reasoning_effort``, say), ``filters.set_params`` forces
fields (a temperature); ``max_concurrent`` answers 429 beyond N requests for one model instead of
queueing them behind llama-server's slots. ``loading_progress`` says what a streaming chat sees
while its model loads: SSE comments (``comments``, the default), reasoning text a chat UI shows
(``reasoning``), or nothing until the answer (``off``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, TypeVar

from pydantic import ValidationInfo, field_validator

from supervisor.config.schema import Strict

T = TypeVar("T", bound=Iterable[str])
LoadingProgress = Literal["off", "comments", "reasoning"]
# Fields a filter may not touch: the proxy routes by the first, and reads the second to know how to answer.
ROUTING_FIELDS = ("model", "stream")


class Filters(Strict):
    strip_params: list[str] = []  # request fields removed before the request reaches the model
    set_params: dict[str, Any] = {}  # request fields forced to these values

    @field_validator("strip_params", "set_params")
    @classmethod
    def _no_routing_field(cls, names: T, info: ValidationInfo) -> T:
        verb, why = {"strip_params": ("stripped", "it"), "set_params": ("set", "the client's own")}[
            info.field_name or ""
        ]
        for name in names:
            if name in ROUTING_FIELDS:
                raise ValueError(
                    f"'{name}' cannot be {verb}: the proxy needs {why} (a filter may not touch "
                    f"{', '.join(ROUTING_FIELDS)})"
                )
        return names

    def apply(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """The request as the model gets it; None when the filters change nothing."""
        if not any(name in payload for name in self.strip_params) and all(
            name in payload and payload[name] == value for name, value in self.set_params.items()
        ):
            return None
        kept = {name: value for name, value in payload.items() if name not in self.strip_params}
        return {**kept, **self.set_params}
