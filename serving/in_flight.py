"""Generation requests in flight, for the admin UI's Live page and its abort action.

Filled from the generation path itself (`start_generation` adds a request once it holds its
seat; the request middleware removes it when the response is complete), so it sees exactly
what the API serves, in-process or from a remote engine, and reads no engine internals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.generation import Generation


@dataclass(frozen=True)
class InFlightRow:
    request_id: str
    tenant: str
    model: str | None
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    elapsed_s: float
    tokens_per_s: float | None  # completion tokens over the time since the first one; None before two


class InFlight:
    def __init__(self):
        self._generations: dict[str, Generation] = {}  # by HTTP request id, in arrival order

    def add(self, generation: Generation) -> None:
        self._generations[generation.record.request_id] = generation

    def discard(self, request_id: str) -> None:
        self._generations.pop(request_id, None)

    def get(self, request_id: str) -> Generation | None:
        return self._generations.get(request_id)

    def rows(self, tenant: str | None = None) -> list[InFlightRow]:
        """Every request in flight, or only `tenant`'s."""
        now = time.perf_counter()
        return [_row(g, now) for g in list(self._generations.values())
                if tenant is None or g.record.tenant == tenant]

    def __len__(self) -> int:
        return len(self._generations)


def _row(generation: Generation, now: float) -> InFlightRow:
    record = generation.record
    elapsed = now - record.arrival_mono
    rate = None
    if record.completion_tokens > 1 and record.token_times:
        decoding = elapsed - record.token_times[0]
        rate = (record.completion_tokens - 1) / decoding if decoding > 0 else None
    return InFlightRow(record.request_id, record.tenant, record.model, record.endpoint, record.prompt_tokens,
                       record.completion_tokens, elapsed, rate)
