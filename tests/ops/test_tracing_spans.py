"""Span tree per request (in-memory exporter) and OTLP/HTTP export to a local collector."""

import http.server
import threading
import time

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ops.tracing import configure_tracing, get_tracer, record_request_spans
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.outputs import RequestTimings
from runtime.request import SamplingParams

STAGES = ["tokenize", "queue", "prefill", "decode", "detokenize"]
NS = 1_000_000_000


@pytest.fixture
def exporter():
    exporter = InMemorySpanExporter()
    configure_tracing("tessera-test", exporter=exporter)
    return exporter


def _timings(**kw) -> RequestTimings:
    base = dict(arrival_time=100.0, first_scheduled_time=100.5, first_token_time=101.0, last_token_time=103.0,
                finished_time=103.25, num_prompt_tokens=12, num_cached_tokens=8, num_generation_tokens=5,
                num_preemptions=1, token_times=[101.0, 101.5, 102.0, 102.5, 103.0], detokenize_seconds=0.125,
                finished_reason="length")
    return RequestTimings(**{**base, **kw})


def test_stage_spans_are_children_of_the_http_span_with_exact_times_and_attributes(exporter):
    with get_tracer().start_as_current_span("POST /v1/completions") as http:
        record_request_spans(http, _timings(), tokenize_start=99.75, tokenize_end=99.875, request_id="cmpl-1",
                             model="tiny")
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert sorted(spans) == sorted(STAGES + ["POST /v1/completions"])
    root = spans["POST /v1/completions"]
    for name in STAGES:
        assert spans[name].parent.span_id == root.context.span_id
        assert spans[name].context.trace_id == root.context.trace_id
        assert spans[name].attributes["gen_ai.response.id"] == "cmpl-1"
        assert spans[name].attributes["gen_ai.request.model"] == "tiny"
    assert [(spans[n].start_time, spans[n].end_time) for n in STAGES] == [
        (int(99.75 * NS), int(99.875 * NS)),
        (100 * NS, int(100.5 * NS)),
        (int(100.5 * NS), 101 * NS),
        (101 * NS, 103 * NS),
        (int(103.125 * NS), int(103.25 * NS)),
    ]
    prefill, decode = spans["prefill"].attributes, spans["decode"].attributes
    assert (prefill["tessera.prompt_tokens"], prefill["gen_ai.usage.input_tokens"]) == (12, 12)
    assert (prefill["tessera.cached_tokens"], prefill["gen_ai.usage.cache_read_input_tokens"]) == (8, 8)
    assert prefill["tessera.preemptions"] == 1
    assert (decode["tessera.generation_tokens"], decode["gen_ai.usage.output_tokens"]) == (5, 5)
    assert decode["gen_ai.response.finish_reasons"] == ("length",)
    assert decode["gen_ai.response.time_to_first_chunk"] == 1.0
    assert spans["tokenize"].attributes["tessera.prompt_tokens"] == 12
    assert spans["detokenize"].attributes["tessera.detokenize_seconds"] == 0.125


def test_a_request_aborted_in_the_queue_has_only_tokenize_and_queue(exporter):
    timings = _timings(first_scheduled_time=None, first_token_time=None, last_token_time=None, token_times=[],
                       finished_time=102.0, num_generation_tokens=0, finished_reason="abort")
    with get_tracer().start_as_current_span("http") as http:
        spans = record_request_spans(http.get_span_context(), timings, tokenize_start=99.0, tokenize_end=99.5)
    assert [s.name for s in spans] == ["tokenize", "queue"]
    queue = next(s for s in exporter.get_finished_spans() if s.name == "queue")
    assert (queue.start_time, queue.end_time) == (100 * NS, 102 * NS)  # waited until the abort
    assert queue.parent.span_id == http.get_span_context().span_id  # a SpanContext works as parent


def test_spans_from_a_real_engine_run_are_in_order(exporter, checkpoint):
    engine = Engine.from_model_dir(checkpoint("llama"), config=EngineConfig(
        block_size=4, num_blocks=32, max_num_seqs=2, max_num_batched_tokens=8, token_buckets=(8,)))
    with get_tracer().start_as_current_span("POST /v1/completions") as http:
        tokenize_start = time.time()
        ids = engine.tokenizer.encode("a prompt for the trace test")
        tokenize_end = time.time()
        request = engine.make_request(ids, SamplingParams(max_tokens=4, temperature=0.0))
        engine.add(request)
        final = None
        while engine.has_unfinished():
            for out in engine.step():
                final = out
        # The engine's timings are monotonic; the API edge dates them, as serving/observability.py does.
        record_request_spans(http, final.timings.to_wall_clock(), tokenize_start=tokenize_start,
                             tokenize_end=tokenize_end)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    ends = [spans[n] for n in STAGES]
    assert all(s.start_time <= s.end_time for s in ends)
    for before, after in zip(ends[:4], ends[1:4]):  # tokenize, queue, prefill, decode follow one another
        assert before.end_time <= after.start_time + 1000  # int() of float seconds: within a microsecond
    assert ends[-1].end_time <= spans["POST /v1/completions"].end_time
    assert spans["POST /v1/completions"].start_time <= ends[0].start_time
    assert spans["decode"].attributes["tessera.generation_tokens"] == 4
    assert spans["prefill"].attributes["tessera.prompt_tokens"] == request.num_prompt_tokens


class _Collector(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Collector.received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_otlp_http_export_reaches_the_collector(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    server = http.server.HTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        provider = configure_tracing("tessera-otlp", otlp_endpoint=f"http://127.0.0.1:{server.server_port}")
        with get_tracer().start_as_current_span("POST /v1/chat/completions") as http_span:
            record_request_spans(http_span, _timings(), tokenize_start=99.0, tokenize_end=99.5)
        assert provider.force_flush(10_000)
    finally:
        server.shutdown()
    (path, content_type, body), = _Collector.received
    assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
    request = ExportTraceServiceRequest.FromString(body)
    resource = request.resource_spans[0]
    service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
    names = sorted(s.name for ss in resource.scope_spans for s in ss.spans)
    assert service == "tessera-otlp"
    assert names == sorted(STAGES + ["POST /v1/chat/completions"])
