"""Which worker takes a request: a pool by weight, then the cheapest worker in it.

    cost = prompt tokens not already cached on the worker
         + decode_cost * requests it runs   (up to its max_num_seqs)
         + queue_cost  * requests it queues (beyond max_num_seqs)

Cached tokens come from the worker's KV events: the prompt's chained block keys
(runtime/block_manager.py `block_key`, the same SHA-256 the worker computes) are looked up in
the keys the worker reported stored, leading blocks only (a prefix hit stops at the first
miss). Load is the larger of what this gateway has in flight there and what the worker last
reported (other gateways' requests). Pools are chosen by smooth weighted round-robin
(nginx's), so weights 3:1 split traffic 3:1 exactly over any four requests; a drained pool,
a pool of weight 0, a drained or unhealthy worker takes nothing new. Plain Python, no I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from runtime.block_manager import ROOT_KEY, AllBlocksCleared, BlockRemoved, BlockStored, block_key
from serving.registry import PoolConfig


@dataclass
class WorkerView:
    worker_id: str
    pool: str = "default"
    region: str = "local"
    block_size: int = 16
    max_num_seqs: int = 16
    cached: set[bytes] = field(default_factory=set)
    in_flight: int = 0  # this gateway's requests on it now
    reported_load: int = 0  # running + waiting, as its latest Stats said
    healthy: bool = False
    drained: bool = False
    degraded: bool = False  # its accelerator is out: small prompts on its CPU (runtime/failover.py)

    def apply(self, event) -> None:
        if isinstance(event, BlockStored):
            self.cached.update(event.keys)
        elif isinstance(event, BlockRemoved):
            self.cached.difference_update(event.keys)
        elif isinstance(event, AllBlocksCleared):
            self.cached.clear()

    @property
    def load(self) -> int:
        return max(self.in_flight, self.reported_load)


def prompt_block_keys(ids: list[int], block_size: int, model_id: str, adapter_id: str = "",
                      salt: str = "") -> list[bytes]:
    """The keys of the prompt's full blocks, as the worker's block manager makes them."""
    keys, parent = [], ROOT_KEY
    for start in range(0, len(ids) - block_size + 1, block_size):
        parent = block_key(parent, ids[start:start + block_size], model_id, adapter_id, salt)
        keys.append(parent)
    return keys


def cached_prefix_blocks(keys: list[bytes], cached: set[bytes]) -> int:
    count = 0
    for key in keys:
        if key not in cached:
            break
        count += 1
    return count


@dataclass
class RoutingCosts:
    decode_cost: float = 16.0
    queue_cost: float = 256.0


class Router:
    def __init__(self, costs: RoutingCosts | None = None, policy: str = "kv"):
        self.costs, self.policy = costs or RoutingCosts(), policy
        self.workers: dict[str, WorkerView] = {}
        self.pools: dict[str, PoolConfig] = {}
        self._current: dict[str, float] = {}  # smooth weighted round-robin state, per pool
        self._turn = itertools.count()

    def pool_config(self, pool: str) -> PoolConfig:
        return self.pools.get(pool, PoolConfig())

    def eligible(self, exclude: Iterable[str] = ()) -> dict[str, list[WorkerView]]:
        """Workers that may take a new request, by pool (pools that may take one only)."""
        skip = set(exclude)
        by_pool: dict[str, list[WorkerView]] = {}
        for w in self.workers.values():
            config = self.pool_config(w.pool)
            if w.healthy and not w.drained and w.worker_id not in skip and not config.drain and config.weight > 0:
                by_pool.setdefault(w.pool, []).append(w)
        return by_pool

    def choose_pool(self, pools: list[str]) -> str:
        weights = {p: self.pool_config(p).weight for p in pools}
        total = sum(weights.values())
        for p in pools:
            self._current[p] = self._current.get(p, 0.0) + weights[p]
        chosen = max(sorted(pools), key=lambda p: self._current[p])
        self._current[chosen] -= total
        return chosen

    def cost(self, worker: WorkerView, num_prompt_tokens: int, keys: list[bytes]) -> float:
        cached_tokens = cached_prefix_blocks(keys, worker.cached) * worker.block_size
        running = min(worker.load, worker.max_num_seqs)
        queued = worker.load - running
        return (num_prompt_tokens - cached_tokens) + self.costs.decode_cost * running + self.costs.queue_cost * queued

    def pick(self, num_prompt_tokens: int, keys: list[bytes], exclude: Iterable[str] = ()) -> WorkerView | None:
        by_pool = self.eligible(exclude)
        if any(not w.degraded for workers in by_pool.values() for w in workers):  # degraded ones only as a last resort
            by_pool = {p: kept for p, workers in by_pool.items() if (kept := [w for w in workers if not w.degraded])}
        if not by_pool:
            return None
        candidates = by_pool[self.choose_pool(list(by_pool))]
        turn = next(self._turn)
        ordered = candidates[turn % len(candidates):] + candidates[:turn % len(candidates)]  # ties rotate
        if self.policy == "round_robin":
            return ordered[0]
        return min(ordered, key=lambda w: (self.cost(w, num_prompt_tokens, keys), w.load))
