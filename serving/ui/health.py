"""The figures of the Health page, its live feed and `tessera top`: one snapshot function.

Everything comes through the engine's protocol (`stats()`, `health()`, the metrics it reports
to) and the server's own admission state; the backend and execution plan are read from the
same Prometheus exposition /metrics serves, so the page never disagrees with the scrape.
"""

from __future__ import annotations

import time

from serving.state import ServerState


def health_snapshot(server: ServerState) -> dict:
    stats = server.engine.stats()
    health = server.engine.health()
    queries, hits = stats.prefix_cache_queries, stats.prefix_cache_hits
    labels = _metric_labels(server.metrics)
    backends = labels.get("tessera:backend_mode", [])
    plan = next(iter(labels.get("tessera:execution_plan", [])), {})
    return {
        "time": time.time(),
        "model": server.model_name,
        "engine_running": health.running,
        "engine_error": health.error,
        "draining": server.admission.draining,
        "requests_in_flight": server.admission.in_flight,
        "num_requests_running": stats.num_requests_running,
        "num_requests_waiting": stats.num_requests_waiting,
        "kv_cache_usage_perc": stats.kv_cache_usage_perc,
        "kv_cache_fragmentation_ratio": stats.kv_cache_fragmentation_ratio,
        "prefix_cache_queries": queries,
        "prefix_cache_hits": hits,
        "prefix_cache_hit_rate": hits / queries if queries else None,
        "num_preemptions": stats.num_preemptions,
        "prompt_tokens": stats.prompt_tokens,
        "generation_tokens": stats.generation_tokens,
        "steps": stats.steps,
        "engine_step_faults": stats.engine_step_faults,
        "backend": next((b["backend"] for b in backends if b.get("_value") == 1.0), None),
        "backends_out": sorted(b["backend"] for b in backends if b.get("_value") == 0.0),
        "execution_plan": {k: v for k, v in plan.items() if k not in ("model_name", "_value")},
        "adapters": _adapters(server),
        "workers": [],  # one in-process engine; the gateway fills this once workers exist
    }


def _adapters(server) -> list[dict]:
    host = server.adapter_host
    adapters = host.adapters if host is not None else None
    return adapters.snapshot()["adapters"] if adapters is not None else []


def _metric_labels(metrics) -> dict[str, list[dict]]:
    """name -> the label sets (with `_value`) of each sample, from the metrics' text exposition."""
    if metrics is None or not hasattr(metrics, "render"):
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    body, _ = metrics.render()
    found: dict[str, list[dict]] = {}
    for family in text_string_to_metric_families(body.decode()):
        if family.name in ("tessera:backend_mode", "tessera:execution_plan"):
            for sample in family.samples:
                found.setdefault(family.name, []).append({**sample.labels, "_value": sample.value})
    return found
