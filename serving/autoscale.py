"""Autoscaler hints: saturation per worker and per pool, and a desired replica count per pool.

    worker saturation = max(requests (running + waiting) / max_num_seqs, KV cache usage)
    pool saturation   = mean over its workers
    desired replicas  = ceil(workers * pool saturation / target), at least 1

A KEDA `metrics-api` scaler (or an HPA on the exported gauge) scales a pool's Deployment on
`desired_replicas`. Numbers older than `stale_after_s` make the pool `stale`, and a stale pool
fails closed: its hint never goes below the replicas it has now (no scale-down on old data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    worker_id: str
    pool: str
    running: int
    waiting: int
    max_num_seqs: int
    kv_cache_usage: float
    age_s: float  # how old these numbers are
    healthy: bool = True

    @property
    def saturation(self) -> float:
        return max((self.running + self.waiting) / max(self.max_num_seqs, 1), self.kv_cache_usage)


def hints(loads: list[WorkerLoad], target: float, stale_after_s: float) -> dict:
    pools: dict[str, list[WorkerLoad]] = {}
    for load in loads:
        pools.setdefault(load.pool, []).append(load)
    body = {"target_saturation": target, "stale_after_s": stale_after_s, "pools": {}, "workers": {}}
    for load in loads:
        body["workers"][load.worker_id] = {
            "pool": load.pool, "saturation": round(load.saturation, 4), "queue_depth": load.waiting,
            "running": load.running, "kv_cache_usage": round(load.kv_cache_usage, 4), "age_s": round(load.age_s, 3),
            "stale": load.age_s > stale_after_s, "healthy": load.healthy,
        }
    for pool, members in sorted(pools.items()):
        saturation = sum(m.saturation for m in members) / len(members)
        stale = any(m.age_s > stale_after_s for m in members)
        desired = max(1, math.ceil(len(members) * saturation / target - 1e-9))
        if stale:
            desired = max(desired, len(members))
        body["pools"][pool] = {
            "replicas": len(members), "saturation": round(saturation, 4),
            "queue_depth": sum(m.waiting for m in members), "desired_replicas": desired, "stale": stale,
        }
    return body
