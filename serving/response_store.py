"""Responses kept for `previous_response_id`: in memory, bounded, per tenant.

`store: true` (OpenAI's default) keeps a response's conversation (its input messages and its
output as messages) until `MAX_STORED` newer ones push it out, or the process ends; nothing is
written to disk and other processes (gateway replicas, workers) do not see it. `store: false`
keeps nothing, so such a response cannot be continued.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

MAX_STORED = 1024


class ResponseStore:
    def __init__(self, capacity: int = MAX_STORED):
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], list[dict]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, tenant: str, response_id: str, messages: list[dict]) -> None:
        with self._lock:
            self._items[(tenant, response_id)] = messages
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, tenant: str, response_id: str) -> list[dict] | None:
        """The conversation up to and including that response; None if unknown (or another tenant's)."""
        with self._lock:
            return self._items.get((tenant, response_id))

