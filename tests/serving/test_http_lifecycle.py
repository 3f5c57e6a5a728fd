"""A client that leaves aborts its request; a full queue answers 429; SIGTERM drains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from serving.app import create_app
from serving.config import ServerConfig
from tests.serving.conftest import MODEL_NAME, SERVER, assert_error, slow_engine, start_server, wait_until

LONG = {"model": MODEL_NAME, "prompt": "The server reads", "max_tokens": 100, "ignore_eos": True, "temperature": 0}


def _idle(engine) -> bool:
    core = engine.engine
    return not core.has_unfinished() and core.blocks.usage == 0.0


def _metric(base_url: str, name: str) -> float:
    for line in httpx.get(base_url + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_a_client_that_disconnects_aborts_within_a_step(base_url, engine, live, stream):
    core = engine.engine
    aborted = f'tessera:request_success_total{{finished_reason="abort",model_name="{MODEL_NAME}"}}'
    aborts_before = _metric(base_url, aborted)
    with slow_engine(engine, 0.02):
        if stream:
            with httpx.stream("POST", base_url + "/v1/completions", json={**LONG, "stream": True}) as response:
                lines = response.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                assert wait_until(lambda: core.has_unfinished(), 2)
                assert core.scheduler.num_unfinished == 1 and core.blocks.usage > 0
                steps_at_close = core.counters.steps
        else:
            with pytest.raises(httpx.ReadTimeout):
                steps_at_close = None
                httpx.post(base_url + "/v1/completions", json=LONG, timeout=0.5)
            steps_at_close = core.counters.steps
        assert wait_until(lambda: _idle(engine), 2)
        steps_after = core.counters.steps - steps_at_close
    assert steps_after <= 2  # the abort reached the loop within a step (plus the disconnect's detection)
    assert core.scheduler.num_unfinished == 0 and core.blocks.usage == 0.0
    assert core.blocks.num_free_blocks == core.blocks.num_blocks  # every page back (cached ones count as free)
    assert wait_until(lambda: live.state.admission.in_flight == 0, 2)
    last = httpx.get(base_url + "/debug/requests", params={"limit": 1}).json()["requests"][-1]
    assert last["status"] == 499 and last["completion_tokens"] < 100
    assert _metric(base_url, aborted) == aborts_before + 1


def test_a_full_queue_answers_429_with_retry_after(engine):
    # Four running (max_num_seqs) and one waiting seat.
    running = start_server(create_app(engine, ServerConfig(**{**SERVER, "max_queue": 1})))
    try:
        results: list[int] = []

        def one() -> None:
            with httpx.stream("POST", running.url + "/v1/completions", json={**LONG, "max_tokens": 30, "stream": True},
                              timeout=60) as response:
                results.append(response.status_code)
                for _ in response.iter_lines():
                    pass

        with slow_engine(engine, 0.02):
            threads = [threading.Thread(target=one) for _ in range(5)]
            for t in threads:
                t.start()
            assert wait_until(lambda: running.state.admission.in_flight == 5, 5)
            refused = httpx.post(running.url + "/v1/completions", json=LONG)
            refused_chat = httpx.post(running.url + "/v1/chat/completions",
                                      json={"messages": [{"role": "user", "content": "Hi"}], "stream": True})
            for t in threads:
                t.join(60)
        error = assert_error(refused, 429, code="queue_full")
        assert error["type"] == "rate_limit_error"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert_error(refused_chat, 429, code="queue_full")
        assert results == [200] * 5
        ok = httpx.post(running.url + "/v1/completions", json={**LONG, "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    finally:
        running.stop()


def _read_events(url: str, body: dict, events: list[str]) -> None:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            events.extend(line[6:] for line in response.iter_lines() if line.startswith("data: "))
    except httpx.RemoteProtocolError:
        events.append("<cut off>")


def test_sigterm_drains_in_flight_streams_and_refuses_new_ones(engine):
    running = start_server(create_app(engine, ServerConfig(**SERVER)))
    events: list[str] = []
    with slow_engine(engine, 0.02):
        reader = threading.Thread(target=_read_events, args=(running.url, {**LONG, "max_tokens": 40}, events))
        reader.start()
        assert wait_until(lambda: running.state.admission.in_flight == 1, 5)
        running.server.handle_exit(signal.SIGTERM, None)  # what uvicorn calls on the signal
        assert wait_until(lambda: running.state.admission.draining, 2)
        refused = httpx.post(running.url + "/v1/completions", json=LONG)
        ready = httpx.get(running.url + "/ready")
        reader.join(30)
        running.thread.join(15)
    assert_error(refused, 503, code="server_draining")
    assert ready.status_code == 503 and ready.json()["draining"] is True
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 40  # the stream ran to its end
    assert not running.thread.is_alive()  # then the server stopped
    assert engine.error is None  # an engine the app does not own keeps running


def test_drain_timeout_cuts_off_what_is_left(engine):
    running = start_server(create_app(engine, ServerConfig(**{**SERVER, "drain_timeout_s": 0.3})))
    events: list[str] = []
    with slow_engine(engine, 0.04):  # 100 tokens: 4 s
        reader = threading.Thread(target=_read_events, args=(running.url, LONG, events))
        reader.start()
        assert wait_until(lambda: running.state.admission.in_flight == 1, 5)
        started = time.monotonic()
        running.server.handle_exit(signal.SIGTERM, None)
        running.thread.join(15)
        stopped_after = time.monotonic() - started
        reader.join(15)
    assert not running.thread.is_alive()
    assert stopped_after < 3  # 0.3 s of drain, then uvicorn's own shutdown (1 s)
    assert events[-1] == "<cut off>" and "[DONE]" not in events  # the 100-token stream was cut
    assert wait_until(lambda: _idle(engine), 5)  # and its request aborted


def test_tessera_serve_drains_on_a_real_sigterm(tiny_model, tmp_path):
    """`tessera serve` in its own process, configured by TESSERA_* variables.

    One token bucket and no warm-up: the process compiles a single program at its first request
    (the test process's compiled programs differ, being traced under jaxtyping's checks)."""
    env = {**os.environ, "TESSERA_MODEL": str(tiny_model), "TESSERA_PORT": "0", "TESSERA_SERVED_MODEL_NAME": "sub",
           "TESSERA_MAX_NUM_SEQS": "4", "TESSERA_MAX_NUM_BATCHED_TOKENS": "8", "TESSERA_MAX_MODEL_LEN": "128",
           "TESSERA_TOKEN_BUCKETS": "8", "TESSERA_NUM_BLOCKS": "64", "TESSERA_WARM_UP": "false",
           "TESSERA_ALLOW_UNSIGNED": "true",  # a test checkpoint, unsigned
           "TESSERA_LOG_FILE": str(tmp_path / "log.jsonl"), "TESSERA_DRAIN_TIMEOUT_S": "30"}
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--port", str(port)], env=env,
                               cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _ready(url) or process.poll() is not None, 120, 0.2)
        assert process.poll() is None, process.stdout.read()
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "sub"
        events: list[str] = []
        reader = threading.Thread(target=_read_events, args=(url, {**LONG, "model": "sub", "max_tokens": 100}, events))
        reader.start()
        assert wait_until(lambda: len(events) > 0 or not reader.is_alive(), 30)
        process.send_signal(signal.SIGTERM)
        reader.join(60)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 100
    log_text = (tmp_path / "log.jsonl").read_text()
    access = [json.loads(line) for line in log_text.splitlines() if '"access"' in line]
    assert access, log_text[-3000:]
    assert [(a["path"], a["status"], a["completion_tokens"]) for a in access][-1] == ("/v1/completions", 200, 100)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
