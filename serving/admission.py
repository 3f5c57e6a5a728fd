"""Admission: a bounded queue (429 with Retry-After when full) and draining (503 once shutdown starts).

The engine runs `max_num_seqs` sequences; `max_queue` more requests may wait. Every request
that reaches the engine holds a ticket until its response is complete.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from serving.errors import APIError


class Ticket:
    def __init__(self, admission: Admission):
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission.in_flight -= 1
            self._admission = None


class Admission:
    def __init__(self, max_running: int, max_queue: int, typical_latency_s: Callable[[], float | None] = lambda: None):
        self.limit = max_running + max_queue
        self.max_running = max_running
        self.in_flight = 0
        self.draining = False
        self._typical_latency_s = typical_latency_s

    def acquire(self) -> Ticket:
        if self.draining:
            raise APIError(503, "the server is shutting down and accepts no new requests", code="server_draining",
                           headers={"Retry-After": "5"})
        if self.in_flight >= self.limit:
            raise APIError(
                429, f"the server's queue is full ({self.in_flight} requests in flight); retry later",
                code="queue_full", headers={"Retry-After": str(self.retry_after_s())},
            )
        self.in_flight += 1
        return Ticket(self)

    def retry_after_s(self) -> int:
        """About when a seat frees: a typical request's latency, times the queue's depth in batches."""
        typical = self._typical_latency_s() or 1.0
        waiting_batches = max(self.in_flight - self.max_running, 0) / max(self.max_running, 1)
        return int(min(max(math.ceil(typical * max(waiting_batches, 1.0)), 1), 60))

    def begin_drain(self) -> None:
        self.draining = True

    async def wait_drained(self, timeout_s: float) -> bool:
        """True once no request is in flight; False if `timeout_s` passed first."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True
