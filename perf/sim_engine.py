"""A simulated engine for scale tests: the `EngineClient` protocol without a model or jax.

Step time and KV cache follow a simple model of one GPU running a small model: a prefill
costs `prefill_s_per_token` per prompt token not in its prefix cache, each decode step
`decode_step_s` plus `decode_s_per_seq` per running sequence, at most `max_num_seqs` run
together and the rest wait. The prefix cache is an LRU of `num_blocks` blocks keyed by the
engine's own chained SHA-256 (runtime/block_manager.py), so a gateway's KV-aware routing sees
real keys and real hits. Output tokens are a function of the prompt, so runs are repeatable.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass

from runtime.block_manager import BlockRemoved, BlockStored
from runtime.engine_client import EngineHealth
from runtime.outputs import CompletionOutput, RequestOutput, RequestTimings
from runtime.request import Request, SamplingParams
from runtime.request_limits import RequestLimits, check_request
from serving.routing import prompt_block_keys


@dataclass(frozen=True)
class SimStats:  # EngineStats' fields (runtime/engine.py), without importing the engine
    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage_perc: float
    kv_cache_fragmentation_ratio: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    iteration_tokens: int
    steps: int
    engine_step_faults: int = 0
    engine_reinitialisations: int = 0
    kv_events_dropped: int = 0


class SimEngine:
    model_id = "demo"
    generation_defaults: dict = {}
    metrics = None
    tokenizer = None  # the worker's handshake sends the tokenizer's files; nothing here tokenizes

    def __init__(self, *, num_blocks: int = 2048, block_size: int = 16, max_num_seqs: int = 32,
                 prefill_s_per_token: float = 2e-5, decode_step_s: float = 0.008, decode_s_per_seq: float = 1e-4,
                 vocab_size: int = 4096, max_model_len: int = 4096):
        self.limits = RequestLimits(max_model_len, vocab_size, num_blocks, block_size, max_num_seqs, 8192, True)
        self.prefill_s_per_token, self.decode_step_s, self.decode_s_per_seq = (
            prefill_s_per_token, decode_step_s, decode_s_per_seq)
        self.cache: OrderedDict[bytes, None] = OrderedDict()
        self.running = self.waiting = 0
        self.queries = self.hits = self.prompt_tokens = self.generation_tokens = self.steps = 0
        self._slots: asyncio.Semaphore | None = None
        self._events: asyncio.Queue = asyncio.Queue()
        self._aborted: set[str] = set()

    @property
    def max_model_len(self) -> int:
        return self.limits.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self.limits.max_num_seqs

    def start(self) -> None:
        self._slots = self._slots or asyncio.Semaphore(self.limits.max_num_seqs)

    def shutdown(self, timeout: float = 10.0) -> None:
        pass

    def make_request(self, prompt, params: SamplingParams, request_id=None, **fields) -> Request:
        ids = list(prompt)
        check_request(ids, params, self.limits)
        return Request(request_id or "sim", ids, params, **fields)

    def _lookup(self, request: Request) -> int:
        """Cached prompt tokens; the prompt's blocks are stored (LRU, evictions reported)."""
        size = self.limits.block_size
        keys = prompt_block_keys(request.prompt_token_ids, size, self.model_id, request.adapter_id, request.cache_salt)
        hit = 0
        for key in keys:
            if key not in self.cache:
                break
            hit += 1
        new = [k for k in keys[hit:]]
        for key in keys:
            self.cache[key] = None
            self.cache.move_to_end(key)
        evicted = []
        while len(self.cache) > self.limits.num_blocks:
            evicted.append(self.cache.popitem(last=False)[0])
        if new:
            self._events.put_nowait(BlockStored(tuple(new), b"", (), size))
        if evicted:
            self._events.put_nowait(BlockRemoved(tuple(evicted)))
        self.queries += len(request.prompt_token_ids)
        self.hits += hit * size
        return hit * size

    async def stream(self, request: Request):
        self.start()
        timings = RequestTimings(request.arrival_time, num_prompt_tokens=request.num_prompt_tokens)
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            timings.first_scheduled_time = time.monotonic()
            cached = self._lookup(request)
            timings.num_cached_tokens = cached
            await asyncio.sleep(self.decode_step_s + self.prefill_s_per_token * (request.num_prompt_tokens - cached))
            self.prompt_tokens += request.num_prompt_tokens
            seed = sum(request.prompt_token_ids)
            n = request.params.max_tokens
            for i in range(n):
                if i:
                    await asyncio.sleep(self.decode_step_s + self.decode_s_per_seq * self.running)
                if request.request_id in self._aborted:
                    self._aborted.discard(request.request_id)
                    return
                token = (seed + 7 * i) % self.limits.vocab_size
                now = time.monotonic()
                timings.token_times.append(now)
                timings.first_token_time = timings.first_token_time or now
                timings.last_token_time = now
                last = i == n - 1
                self.generation_tokens += 1
                self.steps += 1
                if last:
                    timings.finished_time, timings.finished_reason = now, "length"
                    timings.num_generation_tokens = n
                yield RequestOutput(request.request_id, [CompletionOutput(0, f" t{token}", [token], None,
                                                                          "length" if last else None)],
                                    last, request.num_prompt_tokens, cached, i + 1, timings=timings)
        finally:
            self.running -= 1
            self._slots.release()

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    def stats(self) -> SimStats:
        return SimStats(self.running, self.waiting, len(self.cache) / self.limits.num_blocks, 0.0, self.queries,
                        self.hits, 0, self.prompt_tokens, self.generation_tokens, self.running, self.steps)

    def health(self) -> EngineHealth:
        return EngineHealth(True, None)

    async def kv_events(self):
        while True:
            yield await self._events.get()
