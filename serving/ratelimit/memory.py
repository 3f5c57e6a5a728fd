"""Token buckets in this process (one node)."""

from __future__ import annotations

import threading
import time

from serving.ratelimit.buckets import REQUESTS, Bucket, Decision


class MemoryRateLimiter:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._state: dict[str, tuple[float, float]] = {}  # name -> (level, time)
        self._lock = threading.Lock()

    def describe(self) -> str:
        return "memory"

    async def admit(self, buckets: list[Bucket]) -> Decision:
        with self._lock:
            now = self._clock()
            levels = {b: self._level(b, now) for b in buckets}
            waits = [(1.0 - level) / b.rate for b, level in levels.items() if level < 1.0]
            if waits:
                return Decision(False, max(waits), levels)
            for b in buckets:
                if b.kind == REQUESTS:
                    levels[b] -= 1.0
                self._state[b.name] = (levels[b], now)
            return Decision(True, 0.0, levels)

    async def charge(self, buckets: list[Bucket], tokens: int) -> None:
        with self._lock:
            now = self._clock()
            for b in buckets:
                if b.kind != REQUESTS:
                    self._state[b.name] = (self._level(b, now) - tokens, now)

    async def close(self) -> None:
        pass

    def _level(self, bucket: Bucket, now: float) -> float:
        level, then = self._state.get(bucket.name, (bucket.capacity, now))
        return min(bucket.capacity, level + max(now - then, 0.0) * bucket.rate)
