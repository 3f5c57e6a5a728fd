"""Prometheus metrics: vLLM's names, meanings and buckets under the prefix `tessera:`.

A vLLM dashboard or a Kubernetes inference gateway works by changing `vllm:` to `tessera:`.
Counters are exposed with prometheus_client's `_total` suffix, as vLLM's are
(`tessera:prompt_tokens_total`); `tessera:iteration_tokens_total` is a histogram whose name
ends in `_total`, as vLLM's does. Every series carries `model_name`.

Each `TesseraMetrics` has its own `CollectorRegistry`, so tests (and several engines in one
process) never collide in the global one. The engine hands over cumulative counts
(`on_step`); the counters move by the difference since the previous call.

This module reads what it is given by duck typing (the engine's `EngineStats` and
`RequestTimings`): `ops/` imports nothing from the layers above it.
"""

from __future__ import annotations

from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "tessera:"

# vLLM's buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
INTER_TOKEN_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

FINISHED_REASONS = ("stop", "length", "abort")

# jax `Device.memory_stats()` key -> the `kind` label of tessera:device_memory_bytes.
DEVICE_MEMORY_KINDS = {
    "bytes_in_use": "in_use",
    "peak_bytes_in_use": "peak_in_use",
    "bytes_limit": "limit",
    "bytes_reserved": "reserved",
    "largest_free_block_bytes": "largest_free_block",
    "pool_bytes": "pool",
}

# EngineStats field -> counter name; the engine reports these cumulatively.
_CUMULATIVE = {
    "prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
    "prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
    "num_preemptions": "Cumulative number of preemption from the engine.",
    "prompt_tokens": "Number of prefill tokens processed.",
    "generation_tokens": "Number of generation tokens processed.",
    # Tessera's: faults the engine survived (runtime/faults.py).
    "engine_step_faults": "Engine steps that raised; the requests they were computing failed.",
    "engine_reinitialisations": "Faults that took the KV cache with them: cache and compiled step rebuilt.",
    "kv_events_dropped": "KV cache events dropped because no consumer took them before the ring filled.",
    # Tessera's: LoRA adapters (runtime/adapters.py).
    "lora_adapter_hits": "Requests whose LoRA adapter was already in a device slot.",
    "lora_adapter_misses": "Requests whose LoRA adapter had to be copied from host memory into a slot.",
    "lora_adapter_loads": "LoRA adapters loaded (read, checked and registered), replacements included.",
    "lora_adapter_evictions": "Device slots taken from one LoRA adapter for another (least recently used).",
    "lora_adapter_load_seconds": "Seconds spent loading LoRA adapters (reading and checking their files).",
}


# KV tiers below the device: (TierStats field, metric name, help), each labelled by tier.
_KV_TIER_GAUGES = (
    ("bytes", "kv_tier_usage_bytes", "Bytes of KV blocks held by the tier."),
    ("capacity_bytes", "kv_tier_capacity_bytes", "The tier's bound, bytes."),
    ("blocks", "kv_tier_blocks", "KV blocks held by the tier."),
)
_KV_TIER_COUNTERS = (
    ("hits", "kv_tier_hits", "Prefix lookups the tier answered (a device miss found there)."),
    ("loads", "kv_tier_loads", "KV blocks read from the tier towards the device."),
    ("load_seconds", "kv_tier_load_seconds", "Seconds spent reading blocks from the tier."),
    ("evictions", "kv_tier_evictions", "KV blocks the tier evicted (least recently used) to stay in its bound."),
    ("dropped", "kv_tier_dropped", "KV blocks dropped as torn, corrupted or of another model (checked on start "
                                   "and on load)."),
)


class EngineStatsLike(Protocol):
    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage_perc: float
    kv_cache_fragmentation_ratio: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int


class TesseraMetrics:
    def __init__(
        self,
        model_name: str,
        *,
        cache_config: dict[str, str] | None = None,
        backend: str = "cpu",
        execution_plan: dict[str, str] | None = None,
        registry: CollectorRegistry | None = None,
    ):
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry()
        r, m = self.registry, [model_name]

        def gauge(name: str, doc: str) -> Any:
            return Gauge(PREFIX + name, doc, ["model_name"], registry=r).labels(*m)

        def histogram(name: str, doc: str, buckets) -> Any:
            return Histogram(PREFIX + name, doc, ["model_name"], buckets=buckets, registry=r).labels(*m)

        self.num_requests_running = gauge("num_requests_running", "Number of requests in model execution batches.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.kv_cache_fragmentation_ratio = gauge(
            "kv_cache_fragmentation_ratio",
            "Allocated but unused KV-cache slots over allocated slots, over running sequences (0..1).",
        )
        self.counters = {
            name: Counter(PREFIX + name, doc, ["model_name"], registry=r).labels(*m) for name, doc in _CUMULATIVE.items()
        }
        self._seen = dict.fromkeys(_CUMULATIVE, 0)
        success = Counter(
            PREFIX + "request_success", "Count of successfully processed requests.", ["model_name", "finished_reason"],
            registry=r,
        )
        self.request_success = {reason: success.labels(model_name, reason) for reason in FINISHED_REASONS}
        self._success_family = success

        self.iteration_tokens = histogram(
            "iteration_tokens_total", "Histogram of number of tokens per engine_step.", ITERATION_TOKENS_BUCKETS
        )
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", INTER_TOKEN_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS
        )
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS
        )

        self._device_memory = Gauge(
            PREFIX + "device_memory_bytes", "Accelerator memory as the device reports it, by kind.",
            ["model_name", "kind"], registry=r,
        )
        self._backend_mode = Gauge(
            PREFIX + "backend_mode", "1 for the attention backend in service, 0 for one taken out.",
            ["model_name", "backend"], registry=r,
        )
        self._backends: set[str] = set()
        self.set_backend(backend)
        self._backend_changes = Counter(PREFIX + "backend_mode_changes", "Failover mode changes, by the backend "
                                        "serving after the change (cpu_fallback while the accelerator is out).",
                                        ["model_name", "backend"], registry=r)
        self._kv_tier_gauges = {
            field: Gauge(PREFIX + name, doc, ["model_name", "tier"], registry=r)
            for field, name, doc in _KV_TIER_GAUGES
        }
        self._kv_tier_counters = {
            field: Counter(PREFIX + name, doc, ["model_name", "tier"], registry=r)
            for field, name, doc in _KV_TIER_COUNTERS
        }
        self._kv_tier_seen: dict[tuple[str, str], float] = {}
        self.kv_tier_pending_writes = gauge("kv_tier_pending_writes", "KV blocks queued for the disk tier, not yet "
                                            "committed.")
        if cache_config:
            self._info("cache_config_info", "Information of the LLMEngine CacheConfig", cache_config)
        # vLLM's: one series whose labels list the adapters running and waiting, valued at the
        # time of the update (the previous series is removed, so the labels are always now's).
        self._lora_info = Gauge(PREFIX + "lora_requests_info", "Running stats on lora requests.",
                                ["model_name", "max_lora", "running_lora_adapters", "waiting_lora_adapters"],
                                registry=r)
        self._lora_labels: tuple[str, str, str] | None = None
        if execution_plan:
            self._info("execution_plan", "How the engine computes, chosen once at load: attention, weight products "
                       "and their layout, dtype, sampling.", execution_plan)

    def _info(self, name: str, doc: str, labels: dict[str, str]) -> None:
        """A gauge at 1 whose labels carry the information (Prometheus' info pattern)."""
        info = Gauge(PREFIX + name, doc, ["model_name", *sorted(labels)], registry=self.registry)
        info.labels(model_name=self.model_name, **labels).set(1)

    # -- from the engine loop ----------------------------------------------------------------

    def on_step(self, stats: EngineStatsLike, step_tokens: int) -> None:
        """Gauges from the snapshot, counters by what grew since the last call, and the step's
        token count into the iteration histogram (a call with step_tokens=0 records no step)."""
        self.num_requests_running.set(stats.num_requests_running)
        self.num_requests_waiting.set(stats.num_requests_waiting)
        self.kv_cache_usage_perc.set(stats.kv_cache_usage_perc)
        self.kv_cache_fragmentation_ratio.set(stats.kv_cache_fragmentation_ratio)
        for name, counter in self.counters.items():
            value = getattr(stats, name, 0)
            grown = value - self._seen[name]
            if grown < 0:  # a new engine behind the same metrics: its counts start from zero
                grown = value
            if grown:
                counter.inc(grown)
            self._seen[name] = value
        if step_tokens > 0:
            self.iteration_tokens.observe(step_tokens)
        max_lora = getattr(stats, "max_lora", 0)
        if max_lora:
            labels = (str(max_lora), getattr(stats, "running_lora_adapters", ""), getattr(stats, "waiting_lora_adapters", ""))
            if labels != self._lora_labels:
                self._lora_info.clear()
                self._lora_labels = labels
            self._lora_info.labels(self.model_name, *labels).set_to_current_time()
        self._on_kv_tiers(getattr(stats, "kv_tiers", ()), getattr(stats, "kv_tier_pending_writes", 0))

    def _on_kv_tiers(self, tiers, pending_writes: int) -> None:
        """Per tier below the device (runtime/kv_tiers.py): gauges of now, counters by growth."""
        for tier, figures in tiers:
            for field, gauge in self._kv_tier_gauges.items():
                gauge.labels(self.model_name, tier).set(getattr(figures, field))
            for field, counter in self._kv_tier_counters.items():
                value = getattr(figures, field)
                grown = value - self._kv_tier_seen.get((tier, field), 0)
                if grown > 0:
                    counter.labels(self.model_name, tier).inc(grown)
                self._kv_tier_seen[(tier, field)] = value
        if tiers:
            self.kv_tier_pending_writes.set(pending_writes)

    def on_request_finished(self, timings: Any, finished_reason: str) -> None:
        """Count the request and observe its latencies (`RequestTimings` from the engine).

        Latencies that never happened (no first token for a request aborted in the queue)
        are not observed.
        """
        child = self.request_success.get(finished_reason)
        if child is None:
            child = self.request_success[finished_reason] = self._success_family.labels(self.model_name, finished_reason)
        child.inc()
        for histogram, seconds in (
            (self.e2e_request_latency, timings.e2e_seconds),
            (self.request_queue_time, timings.queue_seconds),
            (self.time_to_first_token, timings.ttft_seconds),
        ):
            if seconds is not None:
                histogram.observe(seconds)
        for gap in timings.inter_token_seconds:
            self.inter_token_latency.observe(gap)

    # -- device and backend ---------------------------------------------------------------

    def set_device_memory(self, kind: str, value: int) -> None:
        self._device_memory.labels(self.model_name, kind).set(value)

    def update_device_memory(self, device: Any = None) -> dict[str, int] | None:
        """Export the device's memory statistics (default: jax's first device).

        The CPU backend reports none (None): then nothing is exported, rather than zeros
        that would read as an empty accelerator.
        """
        if device is None:
            import jax  # only here: ops/ stays importable without starting jax

            device = jax.devices()[0]
        stats = device.memory_stats()
        if not stats:
            return None
        for key, kind in DEVICE_MEMORY_KINDS.items():
            if key in stats:
                self.set_device_memory(kind, int(stats[key]))
        return stats

    def note_backend_mode(self, backend: str) -> None:
        """A mode change of the failover (runtime/failover.py): the backend now serving, counted."""
        self.set_backend(backend)
        self._backend_changes.labels(self.model_name, backend).inc()

    def set_backend(self, backend: str) -> None:
        """Mark `backend` as the one in service (1) and every backend seen before as out (0)."""
        self._backends.add(backend)
        for name in self._backends:
            self._backend_mode.labels(self.model_name, name).set(1 if name == backend else 0)

    # -- exposition -----------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The body of GET /metrics and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class GatewayMetrics:
    """`tessera gateway`'s own series, in the registry of its TesseraMetrics (one /metrics)."""

    ROUTING_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)

    def __init__(self, registry: CollectorRegistry, model_name: str):
        r, m = registry, [model_name]
        self.routing_seconds = Histogram(PREFIX + "gateway_routing_seconds", "Time to choose a worker for a request.",
                                         ["model_name"], buckets=self.ROUTING_BUCKETS, registry=r).labels(*m)
        self.retries = Counter(PREFIX + "gateway_retries", "Requests sent to another worker after theirs was lost "
                               "before the first token.", ["model_name"], registry=r).labels(*m)
        self.stream_errors = Counter(PREFIX + "gateway_stream_errors", "Streams ended with an error event: their "
                                     "worker was lost after the first token.", ["model_name"], registry=r).labels(*m)
        self.requests = Counter(PREFIX + "gateway_requests", "Requests finished, by the pool and worker that ran them.",
                                ["pool", "worker"], registry=r)
        self.worker_saturation = Gauge(PREFIX + "worker_saturation", "max(requests / max_num_seqs, KV cache usage) "
                                       "of each worker.", ["pool", "worker"], registry=r)
        self.pool_saturation = Gauge(PREFIX + "pool_saturation", "Mean worker saturation of each pool.", ["pool"],
                                     registry=r)
        self.pool_queue_depth = Gauge(PREFIX + "pool_queue_depth", "Requests waiting on the pool's workers.", ["pool"],
                                      registry=r)
        self.desired_replicas = Gauge(PREFIX + "autoscale_desired_replicas", "Replicas each pool should have "
                                      "(GET /v1/autoscale).", ["pool"], registry=r)
        self.stale = Gauge(PREFIX + "autoscale_stale", "1 when a pool's numbers are too old to trust (the hint "
                           "then never scales down).", ["pool"], registry=r)

    def report(self, hints: dict) -> None:
        """From the body of GET /v1/autoscale (serving/autoscale.py); gone workers' series are dropped."""
        self.worker_saturation.clear()
        for worker_id, w in hints["workers"].items():
            self.worker_saturation.labels(w["pool"], worker_id).set(w["saturation"])
        for pool, p in hints["pools"].items():
            self.pool_saturation.labels(pool).set(p["saturation"])
            self.pool_queue_depth.labels(pool).set(p["queue_depth"])
            self.desired_replicas.labels(pool).set(p["desired_replicas"])
            self.stale.labels(pool).set(1 if p["stale"] else 0)
