"""The server survives its engine's faults (test-only injection, runtime/faults.py): a failed
step fails the requests in it (500, or an error event in a stream, naming the request id), the
next request succeeds; a fault that took the KV cache rebuilds it; a fault the engine cannot
recover from turns /health to 503 so that the orchestrator restarts the process."""

from __future__ import annotations

import io
import json

import httpx
import pytest

from runtime.async_engine import AsyncEngine
from runtime.config import EngineConfig
from runtime.engine import Engine
from serving import observability
from serving.app import create_app
from serving.config import ServerConfig
from tests.serving.conftest import SERVER, assert_error, start_server

BODY = {"prompt": "The scheduler frees", "max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def faulty(tiny_model, log_stream):
    """An engine of its own (the last test leaves it dead), a live server, the audit lines."""
    from ops.audit import configure_audit, reset_audit

    config = EngineConfig(block_size=16, num_blocks=32, max_num_seqs=2, max_num_batched_tokens=16,
                          max_model_len=128, token_buckets=(16,), model_id="faulty")
    core = Engine.from_model_dir(tiny_model, config=config)
    core.warm_up()
    engine = AsyncEngine(core, metrics=observability.make_metrics("faulty", core))
    audit = io.StringIO()
    configure_audit(stream=audit)
    live = start_server(create_app(engine, ServerConfig(**SERVER)))
    live.audit = audit
    live.reference = httpx.post(live.url + "/v1/completions", json=BODY, timeout=60).json()["choices"][0]["text"]
    yield live
    live.stop()
    engine.shutdown()
    reset_audit()


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def test_a_failed_step_fails_its_requests_and_the_next_request_succeeds(faulty, log_stream):
    url, core = faulty.url, faulty.state.engine.engine
    core.faults.arm("step")
    response = httpx.post(url + "/v1/completions", json=BODY, headers={"x-request-id": "fault-plain"}, timeout=60)
    error = assert_error(response, 500, code="engine_error")
    assert error["type"] == "server_error" and error["message"] == (
        "the engine step computing this request failed (InjectedFault); request id fault-plain")

    core.faults.arm("step")
    with httpx.stream("POST", url + "/v1/completions", json={**BODY, "stream": True},
                      headers={"x-request-id": "fault-stream"}, timeout=60) as stream:
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert stream.status_code == 200 and events[-1] == "[DONE]" and len(events) == 2
    assert json.loads(events[0])["error"]["code"] == "engine_error" and "fault-stream" in events[0]

    after = httpx.post(url + "/v1/completions", json=BODY, timeout=60)
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == faulty.reference
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert metric(url, "tessera:engine_step_faults_total") == 2.0
    assert metric(url, 'tessera:request_success_total{finished_reason="error",model_name="faulty"}') == 2.0
    faults = [json.loads(x) for x in faulty.audit.getvalue().splitlines() if '"engine.fault"' in x]
    assert [(f["request_id"], f["kind"], f["outcome"], f["reason"]) for f in faults] == [
        ("fault-plain", "step", "failure", "InjectedFault"), ("fault-stream", "step", "failure", "InjectedFault")]
    logged = [json.loads(x) for x in log_stream.getvalue().splitlines() if "engine step failed" in x]
    assert any("request id fault-plain" in line["event"] for line in logged)


def test_a_fault_that_took_the_kv_cache_reinitialises_the_engine(faulty):
    url, core = faulty.url, faulty.state.engine.engine
    core.faults.arm("device")
    assert_error(httpx.post(url + "/v1/completions", json=BODY, timeout=60), 500, code="engine_error")
    after = httpx.post(url + "/v1/completions", json=BODY, timeout=60)
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == faulty.reference
    assert metric(url, "tessera:engine_reinitialisations_total") == 1.0
    assert (httpx.get(url + "/health").status_code, httpx.get(url + "/ready").status_code) == (200, 200)
    reinit = [json.loads(x) for x in faulty.audit.getvalue().splitlines() if '"reinitialise"' in x]
    assert [(r["outcome"], r["reason"]) for r in reinit] == [("success", "InjectedFault")]


def test_an_unrecoverable_fault_turns_health_to_503(faulty):
    """Last in the module: the engine stays dead."""
    url, core = faulty.url, faulty.state.engine.engine
    core.faults.arm("dead")
    assert_error(httpx.post(url + "/v1/completions", json=BODY, timeout=60), 503, code="engine_dead")
    health = httpx.get(url + "/health")
    assert health.status_code == 503 and health.json()["status"] == "engine failed"
    assert "EngineUnrecoverable" in health.json()["reason"]
    assert httpx.get(url + "/ready").status_code == 503
    assert_error(httpx.post(url + "/v1/completions", json=BODY, timeout=60), 503, code="engine_dead")
