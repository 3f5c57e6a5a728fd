"""Responses kept for `previous_response_id` and `GET`/`DELETE /v1/responses/{id}`: in memory,
bounded, per tenant.

`store: true` (OpenAI's default) keeps a response (its response object as it was answered, and
its conversation: the input messages and its output as messages) until `MAX_STORED` newer ones
push it out, it is deleted, or the process ends; nothing is written to disk and other processes
(gateway replicas, workers) do not see it. `store: false` keeps nothing, so such a response can
be neither continued nor retrieved. Another tenant's response is unknown, as if it did not exist.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

MAX_STORED = 1024


@dataclass(frozen=True, slots=True)
class StoredResponse:
    messages: list[dict]
    """The conversation up to and including this response, as chat messages."""
    body: dict
    """The response object, as the create call answered it (its final state when streamed)."""


class ResponseStore:
    def __init__(self, capacity: int = MAX_STORED):
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, tenant: str, response_id: str, stored: StoredResponse) -> None:
        with self._lock:
            self._items[(tenant, response_id)] = stored
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        """None if unknown (never stored, pushed out, deleted, or another tenant's)."""
        with self._lock:
            return self._items.get((tenant, response_id))

    def delete(self, tenant: str, response_id: str) -> bool:
        """Whether there was such a response."""
        with self._lock:
            return self._items.pop((tenant, response_id), None) is not None
