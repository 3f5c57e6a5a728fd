"""The small endpoints, and what the app exposes of ops/: metrics that move, spans, access lines."""

from __future__ import annotations

import json

import httpx
from litestar.testing import TestClient

from serving.app import create_app
from serving.config import ServerConfig
from tests.serving.conftest import MODEL_NAME, SERVER, wait_until


def test_models_lists_the_served_model(base_url):
    body = httpx.get(base_url + "/v1/models").json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert (card["id"], card["object"], card["max_model_len"], card["owned_by"]) == (MODEL_NAME, "model", 128, "tessera")


def test_tokenize_and_detokenize_round_trip(base_url, engine):
    tokenizer = engine.engine.tokenizer
    text = "Paged attention stores keys"
    body = httpx.post(base_url + "/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert body["tokens"] == tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 128
    assert "".join(body["token_strs"][1:]) == text  # after the bos token
    no_special = httpx.post(base_url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert no_special["tokens"] == body["tokens"][1:]
    assert httpx.post(base_url + "/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": text}

    messages = [{"role": "user", "content": "Hello"}]
    chat = httpx.post(base_url + "/tokenize", json={"messages": messages}).json()
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert chat["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)


def test_health_ready_version(base_url):
    assert httpx.get(base_url + "/health").json() == {"status": "ok"}
    ready = httpx.get(base_url + "/ready")
    assert ready.status_code == 200
    assert ready.json() | {"requests_in_flight": 0} == {
        "status": "ready", "model_loaded": True, "engine_running": True, "draining": False,
        "requests_in_flight": 0, "reason": None}
    version = httpx.get(base_url + "/version").json()
    assert version["model"] == MODEL_NAME and version["backend"] == "cpu" and version["version"]


def test_openapi_schema_names_every_operation(base_url):
    schema = httpx.get(base_url + "/schema/openapi.json").json()
    operations = {op["operationId"] for path in schema["paths"].values() for op in path.values()}
    assert operations >= {"createCompletion", "createChatCompletion", "listModels", "tokenize", "detokenize",
                          "health", "ready", "version", "metrics", "recentRequests"}
    request = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "max_tokens", "logprobs", "stream_options", "top_k", "min_p", "min_tokens", "ignore_eos",
            "stop_token_ids", "repetition_penalty"} <= set(request)


def _metrics(base_url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(base_url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_move_by_exactly_what_was_served(base_url):
    label = f'model_name="{MODEL_NAME}"'
    keys = {
        "prompt": f"tessera:prompt_tokens_total{{{label}}}",
        "generation": f"tessera:generation_tokens_total{{{label}}}",
        "length": f'tessera:request_success_total{{finished_reason="length",{label}}}',
        "e2e": f"tessera:e2e_request_latency_seconds_count{{{label}}}",
        "ttft": f"tessera:time_to_first_token_seconds_count{{{label}}}",
    }
    before = _metrics(base_url)
    response = httpx.post(base_url + "/v1/completions", json={
        "prompt": "The metrics of one request", "max_tokens": 7, "temperature": 0, "ignore_eos": True}).json()
    expected = {"prompt": response["usage"]["prompt_tokens"], "generation": 7, "length": 1, "e2e": 1, "ttft": 1}

    def moved() -> dict[str, float]:
        after = _metrics(base_url)
        return {k: after.get(name, 0) - before.get(name, 0) for k, name in keys.items()}

    assert wait_until(lambda: moved() == expected, 3), moved()
    assert _metrics(base_url)[f"tessera:num_requests_running{{{label}}}"] == 0


def test_metrics_show_the_engine_s_execution_plan(base_url):
    # The session's engine: float32 on one CPU with the kernel library, nothing forced.
    plan = [line for line in httpx.get(base_url + "/metrics").text.splitlines()
            if line.startswith("tessera:execution_plan{")]
    assert plan == ['tessera:execution_plan{attention="cpu",device="cpu",dtype="float32",fused="true",layout="dense",'
                    f'linear="cpu",model_name="{MODEL_NAME}",sampling="cpu",tensor_parallel="1"}} 1.0']
    assert f'tessera:backend_mode{{backend="cpu",model_name="{MODEL_NAME}"}} 1.0' in httpx.get(base_url + "/metrics").text


def test_debug_requests_shows_token_timings_without_text(base_url):
    secret = "debug ring secret words"
    response = httpx.post(base_url + "/v1/completions", json={
        "prompt": secret, "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    request_id = response.headers["x-request-id"]
    body = httpx.get(base_url + "/debug/requests").json()
    assert body["capacity"] == 256
    entry = next(r for r in body["requests"] if r["request_id"] == request_id)
    assert (entry["endpoint"], entry["status"], entry["model"]) == ("/v1/completions", 200, MODEL_NAME)
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (response.json()["usage"]["prompt_tokens"], 5)
    assert entry["finish_reasons"] == ["length"]
    assert len(entry["token_times_s"]) == 5 and entry["token_times_s"] == sorted(entry["token_times_s"])
    assert 0 < entry["ttft_s"] <= entry["e2e_s"] and abs(entry["ttft_s"] - entry["token_times_s"][0]) < 1e-5
    assert entry["prompt"] is None and entry["completion"] is None
    assert secret not in json.dumps(body)
    assert len(httpx.get(base_url + "/debug/requests", params={"limit": 1}).json()["requests"]) == 1


def test_debug_requests_shows_text_with_prompt_logging_on(engine):
    with TestClient(create_app(engine, ServerConfig(**{**SERVER, "log_prompts": True}))) as client:
        response = client.post("/v1/completions", json={"prompt": "visible words", "max_tokens": 3, "temperature": 0})
        entry = client.get("/debug/requests").json()["requests"][-1]
    assert entry["prompt"] == "visible words"
    assert entry["completion"] == response.json()["choices"][0]["text"]


def test_each_request_has_an_access_line_without_its_prompt(base_url, log_stream):
    secret = "access line secret prompt"
    response = httpx.post(base_url + "/v1/completions", json={
        "prompt": secret, "max_tokens": 4, "temperature": 0, "ignore_eos": True}, headers={"x-request-id": "trace-me-1"})
    assert response.headers["x-request-id"] == "trace-me-1"

    def line():
        for raw in log_stream.getvalue().splitlines():
            entry = json.loads(raw)
            if entry.get("event") == "access" and entry.get("request_id") == "trace-me-1":
                return entry
        return None

    assert wait_until(lambda: line() is not None, 3)
    entry = line()
    assert (entry["method"], entry["path"], entry["status"], entry["tenant"]) == ("POST", "/v1/completions", 200, "default")
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (response.json()["usage"]["prompt_tokens"], 4)
    assert entry["prompt"] == f"[redacted, {len(secret)} chars]"
    assert entry["completion"].startswith("[redacted, ")
    assert 0 < entry["ttft_s"] <= entry["e2e_s"]
    assert secret not in log_stream.getvalue()
    bad = httpx.post(base_url + "/v1/completions", json={"prompt": 5}, headers={"x-request-id": "trace-me-2"})
    assert bad.status_code == 400
    assert wait_until(lambda: '"trace-me-2"' in log_stream.getvalue(), 3)


def test_a_request_leaves_an_http_span_with_its_stage_spans(base_url):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from ops.tracing import configure_tracing

    exporter = InMemorySpanExporter()
    configure_tracing("tessera-test", exporter=exporter, set_global=False)
    response = httpx.post(base_url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "trace"}], "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    request_id = response.headers["x-request-id"]

    def spans():
        found = exporter.get_finished_spans()
        http = [s for s in found if s.attributes.get("tessera.request_id") == request_id]
        return http[0] if http else None, found

    assert wait_until(lambda: spans()[0] is not None, 3)
    http, found = spans()
    assert http.name == "POST /v1/chat/completions"
    assert http.attributes["http.response.status_code"] == 200
    assert http.attributes["gen_ai.usage.output_tokens"] == 3
    children = {s.name: s for s in found if s.parent is not None and s.parent.span_id == http.context.span_id}
    assert sorted(children) == sorted(["tokenize", "queue", "prefill", "decode", "detokenize"])
    assert children["decode"].attributes["tessera.generation_tokens"] == 3
    assert children["tokenize"].start_time >= http.start_time and children["decode"].end_time <= http.end_time
    configure_tracing("tessera-test", set_global=False)  # later requests go to no exporter
