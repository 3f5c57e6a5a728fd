"""The app's side of ops/: metrics, the HTTP span and its stage spans, the access line.

ops/ is written beside the server; until a module exists (or where its import fails for a
missing optional package), the app runs without it and /metrics answers 503.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)


def _optional(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        log.warning("%s unavailable (%s): running without it", module, e)
        return None


_metrics = _optional("ops.metrics")
_tracing = _optional("ops.tracing")
_logging = _optional("ops.logging")


def make_metrics(model_name: str, engine: Any) -> Any | None:
    """A TesseraMetrics for this engine (AsyncEngine updates it from its loop thread)."""
    if _metrics is None:
        return None
    import jax

    cache_config = engine.cache_config_info() if hasattr(engine, "cache_config_info") else None
    backend = engine.backend_mode() if hasattr(engine, "backend_mode") else jax.default_backend()
    plan = engine.plan.labels() if hasattr(engine, "plan") else None
    metrics = _metrics.TesseraMetrics(model_name, cache_config=cache_config, backend=backend, execution_plan=plan)
    if hasattr(engine, "stats"):  # figures known before the first step (blocks restored from a KV tier)
        metrics.on_step(engine.stats(), 0)
    return metrics


def configure(config) -> None:
    """Process-wide logging and tracing from a ServerConfig; `tessera serve` calls it once."""
    root = logging.getLogger()
    for handler in list(root.handlers):  # e.g. absl's basicConfig, run when orbax is imported
        root.removeHandler(handler)
    if _logging is not None:
        _logging.configure_logging(
            config.log_level, json=config.log_json, log_file=config.log_file, max_bytes=config.log_max_bytes,
            backup_count=config.log_backup_count, log_prompts=config.log_prompts,
            tenant_sample_ratios=config.tenant_sample_ratios(), default_sample_ratio=config.log_sample_ratio,
        )
    else:
        logging.basicConfig(level=config.log_level.upper())
    if _tracing is not None:
        _tracing.configure_tracing("tessera", otlp_endpoint=config.otlp_endpoint)


def start_http_span(name: str, attributes: dict[str, Any]) -> Any | None:
    if _tracing is None:
        return None
    from opentelemetry.trace import SpanKind

    return _tracing.get_tracer().start_span(name, kind=SpanKind.SERVER, attributes=attributes)


def end_http_span(span: Any | None, record) -> None:
    """Stage spans (tokenize, queue, prefill, decode, detokenize) under the HTTP span, then end it."""
    if span is None:
        return
    try:
        span.set_attribute("http.response.status_code", record.status)
        span.set_attribute("gen_ai.usage.input_tokens", record.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", record.completion_tokens)
        for timings in record.engine_timings:
            _tracing.record_request_spans(  # the edge: the engine's monotonic times become dates
                span, timings.to_wall_clock(), tokenize_start=record.tokenize_start, tokenize_end=record.tokenize_end,
                request_id=record.request_id, model=record.model,
            )
        if record.status >= 500:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR))
    finally:
        span.end()


def access_log(record, method: str, path: str) -> None:
    fields = dict(
        request_id=record.request_id, tenant=record.tenant, method=method, path=path, status=record.status,
        prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens, ttft_s=record.ttft_s,
        e2e_s=record.e2e_s,
    )
    extra = {"model": record.model, "cached_tokens": record.cached_tokens, "user": record.user,
             "finish_reasons": record.finish_reasons or None}
    if _logging is not None:
        _logging.access_log(**fields, prompt=record.prompt_text, completion=record.completion_text,
                            **{k: v for k, v in extra.items() if v is not None})
    else:
        log.info("access %s", fields)
