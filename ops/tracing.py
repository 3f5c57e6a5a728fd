"""OpenTelemetry traces: a span tree per request, HTTP -> tokenize, queue, prefill, decode, detokenize.

The HTTP server span is the app's (Litestar's OpenTelemetry plugin, or a span of its own).
The engine's stages happen on its loop thread, interleaved with other requests, so they
are not traced live: when a request finishes, `record_request_spans` creates its stage
spans after the fact, as children of the HTTP span, with the start and end times the
engine wrote into the request's `RequestTimings`.

    configure_tracing("tessera", otlp_endpoint="http://collector:4318")   # at start-up
    with get_tracer().start_as_current_span("POST /v1/completions") as http:
        ... tokenize, generate ...
        record_request_spans(http, output.timings, tokenize_start=t0, tokenize_end=t1)
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext

TRACER_NAME = "tessera"
OTLP_TRACES_PATH = "/v1/traces"

_provider: TracerProvider | None = None
_global_set = False


def configure_tracing(
    service_name: str = "tessera",
    otlp_endpoint: str | None = None,
    exporter: SpanExporter | None = None,
    *,
    set_global: bool = True,
) -> TracerProvider:
    """A tracer provider for this process, which `get_tracer()` uses from now on.

    `otlp_endpoint` is the collector's base URL (as OTEL_EXPORTER_OTLP_ENDPOINT: `/v1/traces`
    is appended unless present); spans go there in batches over OTLP/HTTP. `exporter` gets
    every span as it ends (tests pass an `InMemorySpanExporter`). The first provider made
    with `set_global` also becomes OpenTelemetry's global one, which other instrumentation
    uses; OpenTelemetry allows that only once per process, later ones stay local.
    """
    global _provider, _global_set
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        url = otlp_endpoint.rstrip("/")
        if not url.endswith(OTLP_TRACES_PATH):
            url += OTLP_TRACES_PATH
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    _provider = provider
    if set_global and not _global_set:
        trace.set_tracer_provider(provider)
        _global_set = True
    return provider


def get_tracer() -> trace.Tracer:
    """Tessera's tracer: from the configured provider, else OpenTelemetry's global one
    (a no-op until something configures it)."""
    provider = _provider if _provider is not None else trace.get_tracer_provider()
    return provider.get_tracer(TRACER_NAME)


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _parent_context(parent: Span | SpanContext | None) -> Context | None:
    if parent is None:
        return None  # the current context
    if isinstance(parent, SpanContext):
        parent = NonRecordingSpan(parent)
    return trace.set_span_in_context(parent)


def record_request_spans(
    parent: Span | SpanContext | None,
    timings: Any,
    *,
    tokenize_start: float,
    tokenize_end: float,
    detokenize_seconds: float | None = None,
    request_id: str | None = None,
    model: str | None = None,
) -> list[Span]:
    """Create the request's stage spans under `parent` (a span, its context, or None for the
    current span), from wall-clock times in seconds; returns them, ended, in order.

    - tokenize: tokenize_start .. tokenize_end
    - queue: arrival .. first scheduled (or the end, for a request that never ran)
    - prefill: first scheduled .. first token (chunks and any preemption included)
    - decode: first token .. last token
    - detokenize: the text was made token by token during decode; this span shows that
      work's summed duration (`detokenize_seconds`, default the engine's count), ending
      where the request ended.
    Stages a request never reached (aborted in the queue, say) get no span.
    """
    tracer = get_tracer()
    context = _parent_context(parent)
    common: dict[str, Any] = {}
    if request_id is not None:
        common["gen_ai.response.id"] = request_id
    if model is not None:
        common["gen_ai.request.model"] = model
    end = timings.finished_time or timings.last_token_time or timings.arrival_time
    prompt = {"tessera.prompt_tokens": timings.num_prompt_tokens, "gen_ai.usage.input_tokens": timings.num_prompt_tokens}

    stages: list[tuple[str, float, float, dict[str, Any]]] = [
        ("tokenize", tokenize_start, tokenize_end, prompt),
        ("queue", timings.arrival_time, timings.first_scheduled_time or end, {}),
    ]
    if timings.first_scheduled_time is not None:
        stages.append((
            "prefill", timings.first_scheduled_time, timings.first_token_time or end,
            {
                **prompt,
                "tessera.cached_tokens": timings.num_cached_tokens,
                "gen_ai.usage.cache_read_input_tokens": timings.num_cached_tokens,
                "tessera.preemptions": timings.num_preemptions,
            },
        ))
    if timings.first_token_time is not None:
        decode = {
            "tessera.generation_tokens": timings.num_generation_tokens,
            "gen_ai.usage.output_tokens": timings.num_generation_tokens,
            "gen_ai.response.time_to_first_chunk": timings.first_token_time - timings.arrival_time,
        }
        if timings.finished_reason is not None:
            decode["gen_ai.response.finish_reasons"] = (timings.finished_reason,)
        stages.append(("decode", timings.first_token_time, timings.last_token_time or end, decode))
        seconds = timings.detokenize_seconds if detokenize_seconds is None else detokenize_seconds
        stages.append((
            "detokenize", end - seconds, end,
            {"tessera.generation_tokens": timings.num_generation_tokens, "tessera.detokenize_seconds": seconds},
        ))

    spans = []
    for name, start, stop, attributes in stages:
        span = tracer.start_span(name, context=context, start_time=_ns(start), attributes={**common, **attributes})
        span.end(end_time=max(_ns(stop), _ns(start)))
        spans.append(span)
    return spans
