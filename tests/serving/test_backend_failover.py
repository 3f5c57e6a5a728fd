"""Backend failover (runtime/failover.py) through the HTTP server: 16 streams are running when the
accelerator's engine starts failing (test-only fault injection: every step and every recovery
probe fails); none hangs, each finishes or ends with an error event; small prompts are then
served on the CPU engine within 5 s, large ones get 503 with Retry-After; when the fault
clears the probe brings the accelerator back; metrics show each mode change.

Here both engines run on the CPU (no accelerator on the test machine): the failover logic does
not depend on the device, and the accelerator's label is the primary's ("cpu")."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import jax
import pytest

from runtime.async_engine import AsyncEngine
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.failover import ACCELERATOR, CPU_FALLBACK, FailoverConfig, FailoverEngine, recover_async_engine
from serving import observability
from serving.app import create_app
from serving.config import ServerConfig
from tests.helpers.cluster import free_port
from tests.helpers.kv_restart import metric
from tests.serving.conftest import SERVER, assert_error, start_server

CONFIG = dict(block_size=16, num_blocks=64, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128,
              token_buckets=(64,), model_id="failover")
SMALL = {"prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
LARGE = {**SMALL, "prompt": list(range(10, 60))}  # 50 tokens: over the fallback's 32


def failover_engine(tiny_model, metrics=None, **failover) -> tuple[Engine, FailoverEngine]:
    """A warmed engine on the default device behind a FailoverEngine whose CPU fallback is the same
    model; (the primary's core, the failover engine). `failover`: FailoverConfig's fields."""
    core = Engine.from_model_dir(tiny_model, config=EngineConfig(**CONFIG))
    core.warm_up()

    def build_fallback():
        engine = Engine.from_model_dir(tiny_model, config=EngineConfig(**CONFIG), devices=jax.devices("cpu"))
        engine.warm_up()
        return AsyncEngine(engine)

    engine = FailoverEngine(AsyncEngine(core, metrics=metrics(core) if metrics else None), build_fallback,
                            recover_async_engine, FailoverConfig(max_prompt_tokens=32, **failover),
                            accelerator_label=core.backend_mode())
    return core, engine


@pytest.fixture(scope="module")
def failover(tiny_model, log_stream):
    core, engine = failover_engine(tiny_model, lambda core: observability.make_metrics("failover", core),
                                   keep_warm=True, probe_interval_s=0.5, retry_after_s=30)
    live = start_server(create_app(engine, ServerConfig(**{**SERVER, "max_queue": 16})))
    live.engine, live.core = engine, core
    yield live
    core.faults.disarm()
    live.stop()
    engine.shutdown()


async def until(condition, what: str) -> None:
    """Wait up to 30 s for `condition()`; fail naming `what`."""
    for _ in range(600):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _stream(url: str, body: dict, result: dict) -> None:
    """One streamed completion: its HTTP status and its SSE data lines."""
    events = result.setdefault("events", [])
    try:
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as response:
            result["status"] = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
    except httpx.HTTPError as e:
        result["transport_error"] = repr(e)


def test_streams_end_cleanly_small_prompts_move_to_the_cpu_and_the_accelerator_returns(failover):
    url, engine, core = failover.url, failover.engine, failover.core
    reference = httpx.post(url + "/v1/completions", json=SMALL, timeout=60).json()["choices"][0]["text"]
    large_reference = httpx.post(url + "/v1/completions", json=LARGE, timeout=60).json()["choices"][0]["text"]
    assert engine.mode == ACCELERATOR

    results = [{} for _ in range(16)]
    threads = [threading.Thread(target=_stream, args=(url, {**SMALL, "prompt": [5 + i, 6, 7], "max_tokens": 60},
                                                      results[i])) for i in range(16)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while sum(bool(r.get("events")) for r in results) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)  # the first four (max_num_seqs) are streaming; the rest wait in the queue

    failed_at = time.monotonic()
    core.faults.arm("dead")
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a stream hung"
    finished = errored = 0
    for r in results:
        assert "transport_error" not in r, r
        if r["status"] != 200:
            assert r["status"] == 503  # refused before its response started (queued when the engine died)
            continue
        last = json.loads(r["events"][-2]) if r["events"][-1] == "[DONE]" else json.loads(r["events"][-1])
        if "error" in last:
            errored += 1
        else:
            assert r["events"][-1] == "[DONE]" and last["choices"][0]["finish_reason"] == "length"
            finished += 1
    assert errored >= 4  # those running when the fault came

    # Degraded: small prompts on the CPU engine within 5 s of the fault, the same greedy text.
    while True:
        response = httpx.post(url + "/v1/completions", json=SMALL, timeout=60)
        if response.status_code == 200:
            break
        assert time.monotonic() - failed_at < 5, response.text
        time.sleep(0.05)
    assert time.monotonic() - failed_at < 5
    assert engine.mode == CPU_FALLBACK
    assert response.json()["choices"][0]["text"] == reference
    refused = httpx.post(url + "/v1/completions", json=LARGE, timeout=60)
    assert_error(refused, 503, code="backend_degraded", message_has="50")
    assert refused.headers["retry-after"] == "30"
    assert httpx.get(url + "/health", timeout=5).status_code == 200  # degraded, still serving
    assert metric(url, "tessera:backend_mode", backend="cpu_fallback") == 1
    assert metric(url, "tessera:backend_mode", backend="cpu") == 0
    assert metric(url, "tessera:backend_mode_changes_total", backend="cpu_fallback") == 1
    time.sleep(1.2)  # probes fail while the fault lasts
    assert engine.mode == CPU_FALLBACK

    # The fault clears: the next probe rebuilds the accelerator's cache and step, and it serves again.
    core.faults.disarm()
    deadline = time.monotonic() + 15
    while engine.mode != ACCELERATOR and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.mode == ACCELERATOR
    response = httpx.post(url + "/v1/completions", json=LARGE, timeout=60)
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == large_reference
    assert metric(url, "tessera:backend_mode", backend="cpu") == 1
    assert metric(url, "tessera:backend_mode", backend="cpu_fallback") == 0
    assert metric(url, "tessera:backend_mode_changes_total", backend="cpu") == 1
    assert [mode for _, mode in engine.mode_changes] == [CPU_FALLBACK, ACCELERATOR]
    print(f"16 streams: {finished} finished, {errored} error events, {16 - finished - errored} refused with 503")


def test_the_worker_record_in_etcd_follows_the_backend_mode():
    """The worker re-writes its etcd record when its engine's mode changes (the gateway reads
    `backend_mode` and prefers accelerator workers: tests/serving/test_routing.py)."""

    from runtime.engine_client import EngineHealth
    from serving.registry import WorkerRecord
    from serving.worker import WorkerServer

    class Engine:
        health_now = EngineHealth(True)

        def health(self):
            return self.health_now

    class Registration:
        def __init__(self):
            self.record, self.written = WorkerRecord("w1", "127.0.0.1:1"), []

        async def update(self):
            self.written.append(WorkerRecord.from_json(self.record.to_json()).backend_mode)

    async def go():
        engine = Engine()
        server = WorkerServer(engine, worker_id="w1")
        server.registration = Registration()
        await server._set_health()
        engine.health_now = EngineHealth(True, None, CPU_FALLBACK)
        await server._set_health()
        await server._set_health()
        engine.health_now = EngineHealth(True)
        await server._set_health()
        return server.registration.written

    assert asyncio.run(go()) == [CPU_FALLBACK, ACCELERATOR]


def test_the_worker_s_kv_events_follow_the_recovered_engine(tiny_model):
    """The worker's KvEvents hub (serving/worker.py) drains the engine's KV events: when the
    accelerator's engine dies its stream ends, and after the probe brings the accelerator back
    (a new loop) the hub subscribes again. Its summary and a subscriber that stayed connected
    see the recovery's AllBlocksCleared, then the keys the recovered engine caches."""
    import contextlib

    from runtime.block_manager import AllBlocksCleared, BlockStored
    from runtime.engine_client import EngineDeadError
    from runtime.request import SamplingParams
    from serving.registry import KvSummary
    from serving.worker import KvEventHub

    core, engine = failover_engine(tiny_model, keep_warm=False, probe_interval_s=0.5)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    before, after = list(range(100, 140)), list(range(200, 240))  # 40 tokens: two full pages of 16

    async def complete(prompt):
        async for _ in engine.stream(engine.make_request(prompt, params)):
            pass

    async def go():
        engine.start()
        summary = KvSummary()
        hub = KvEventHub(engine, summary)
        hub.start()
        snapshot, queue = hub.subscribe()
        assert snapshot == []
        seen = []

        async def collect():
            while True:
                seen.append(await queue.get())

        collector = asyncio.ensure_future(collect())
        await complete(before)
        await until(lambda: len(summary.keys) == 2, "the first prompt's two pages")
        first_keys = list(summary.keys)

        core.faults.arm("dead")  # every step and every probe fails until disarmed
        with contextlib.suppress(EngineDeadError):  # or it ends with an error output
            await complete(list(range(300, 320)))
        await until(lambda: engine.mode == CPU_FALLBACK, "the fallback")
        await asyncio.sleep(1.5)  # the hub retries meanwhile
        core.faults.disarm()
        await until(lambda: engine.mode == ACCELERATOR, "the accelerator's return")

        await complete(after)
        await until(lambda: len(summary.keys) == 2 and not set(summary.keys) & set(first_keys),
                    "the recovered engine's pages")
        await until(lambda: any(isinstance(e, BlockStored) and set(e.keys) == set(summary.keys) for e in seen),
                    "the subscriber's copy")
        collector.cancel()
        await hub.close()
        assert None not in seen  # never cut off
        cleared = next(i for i, e in enumerate(seen) if isinstance(e, AllBlocksCleared))
        stored = [i for i, e in enumerate(seen) if isinstance(e, BlockStored)]
        assert stored[0] < cleared < stored[-1]  # the first prompt's pages, the recovery, the new pages

    try:
        asyncio.run(go())
    finally:
        core.faults.disarm()
        engine.shutdown()


def test_a_gateway_answers_503_with_the_degraded_worker_s_retry_after(tiny_model):
    """A worker whose accelerator is out refuses a prompt too large for its CPU (gRPC UNAVAILABLE
    with a retry-after trailer). With no other worker, the gateway answers as the worker's own
    HTTP server would: 503 `backend_degraded` with its Retry-After; the worker stays in
    routing (it is alive) and the gateway's small prompts are still served there."""

    import uvicorn

    from serving import registry
    from serving.gateway import GatewayEngine
    from serving.remote_engine import remote_engine
    from serving.worker import WorkerServer

    core, engine = failover_engine(tiny_model, keep_warm=True, probe_interval_s=600, retry_after_s=17)

    async def go():
        worker = WorkerServer(engine, worker_id="w1", tokenizer_dir=tiny_model)
        port = await worker.start()
        core.faults.arm("dead")  # the accelerator's engine dies at its next step
        from runtime.engine_client import EngineDeadError
        from runtime.request import SamplingParams

        try:
            async for _ in engine.stream(engine.make_request([5, 6, 7], SamplingParams(max_tokens=2))):
                pass
        except EngineDeadError:
            pass
        await until(lambda: engine.mode == CPU_FALLBACK, "the fallback")

        async with remote_engine(f"127.0.0.1:{port}") as handshake:
            info = handshake.info
        gateway = GatewayEngine("127.0.0.1:1", info, seats=4)  # no etcd: the worker's record is put by hand
        record = registry.WorkerRecord("w1", f"127.0.0.1:{port}", model=info.model_id, backend_mode=CPU_FALLBACK,
                                       capacity={"block_size": 16, "max_num_seqs": 4})
        gateway._apply_put(registry.WORKERS + "w1", record.to_json())
        view = gateway.handles["w1"].view
        await until(lambda: gateway.handles["w1"].engine is not None and view.healthy, "the gateway's dial")
        # The gateway's HTTP server in this loop (the gateway's gRPC channels live here).
        http = uvicorn.Server(uvicorn.Config(create_app(gateway, ServerConfig(**SERVER)), host="127.0.0.1",
                                             port=free_port(), log_level="warning", lifespan="on"))
        serving = asyncio.ensure_future(http.serve())
        try:
            await until(lambda: http.started, "the gateway's HTTP server")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http.config.port}", timeout=60) as client:
                refused = await client.post("/v1/completions", json=LARGE)
                assert_error(refused, 503, code="backend_degraded", message_has="tried 1")
                assert refused.headers["retry-after"] == "17"
                assert view.healthy and gateway.handles["w1"].engine is not None  # kept in routing
                served = await client.post("/v1/completions", json=SMALL)
                assert served.status_code == 200, served.text
                assert served.json()["usage"]["completion_tokens"] == 6
        finally:
            http.should_exit = True
            await serving
            await gateway.close()
            await worker.stop(0)

    try:
        asyncio.run(go())
    finally:
        core.faults.disarm()
        engine.shutdown()
