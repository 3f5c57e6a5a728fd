"""Real etcd, three `tessera worker` processes on the demo model and one `tessera gateway`.

Greedy output through the gateway equals `tessera serve`'s; the registry's keys are as
documented; a worker killed with SIGKILL under 32 concurrent streams loses no request that had
not started streaming (retried elsewhere), the started ones end with an error event; a new
worker takes traffic within 2 s of registering.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from serving import registry
from tests.helpers.cluster import start_etcd, start_gateway, start_worker

PROMPTS = ["Once upon a time", "The little dog ran to the", "She opened the door and saw", "In the morning the"]


@pytest.fixture(scope="module")
def cluster():
    etcd, endpoint = start_etcd()
    workers, gateway = [], None
    try:
        workers = [start_worker(None, endpoint) for _ in range(3)]
        gateway = start_gateway(endpoint)
        yield endpoint, workers, gateway
    finally:
        if gateway is not None:
            gateway.stop()
        for worker in workers:
            worker.stop()
        etcd.stop()


def _metric(url: str, name: str, labels: str = "") -> float:
    prefix = f"{name}{{{labels}" if labels else name
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(prefix) and (labels or line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _etcd(endpoint: str, coroutine_fn):
    async def go():
        async with registry.connect(endpoint) as client:
            return await coroutine_fn(client)

    return asyncio.run(go())


def test_greedy_output_through_the_gateway_equals_tessera_serve(cluster):
    from litestar.testing import TestClient

    from runtime.async_engine import AsyncEngine
    from runtime.config import EngineConfig
    from runtime.engine import Engine
    from serving.app import create_app
    from serving.config import ServerConfig
    from serving.default_model import resolve_model

    _, _, gateway = cluster
    config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, num_blocks=128,
                          token_buckets=(8, 64), model_id="demo")
    engine = AsyncEngine(Engine.from_model_dir(resolve_model(None), config=config))
    body = {"model": "demo", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    with TestClient(create_app(engine, ServerConfig(served_model_name="demo", tokenizer_workers=1))) as serve:
        expected = [serve.post("/v1/completions", json={**body, "prompt": p}).json()["choices"][0]["text"]
                    for p in PROMPTS]
    engine.shutdown()

    async def through_gateway():
        async with httpx.AsyncClient(base_url=gateway.address, timeout=60) as client:
            replies = await asyncio.gather(*(client.post("/v1/completions", json={**body, "prompt": p})
                                             for p in PROMPTS))
            return [r.json() for r in replies]

    replies = asyncio.run(through_gateway())
    assert [r["choices"][0]["text"] for r in replies] == expected
    assert all(r["usage"]["completion_tokens"] == 16 for r in replies)
    chat = httpx.post(gateway.address + "/v1/chat/completions", timeout=60,
                      json={"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 4


def test_bad_input_is_a_400_before_any_worker_is_asked(cluster):
    _, _, gateway = cluster
    reply = httpx.post(gateway.address + "/v1/completions", timeout=30,
                       json={"model": "demo", "prompt": "Once upon a time", "max_tokens": 300})
    assert reply.status_code == 400
    assert reply.json()["error"]["message"].startswith("max_tokens=300 is too large")
    unknown = httpx.post(gateway.address + "/v1/completions", timeout=30, json={"model": "other", "prompt": "x"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_each_worker_keeps_a_record_and_a_kv_summary_under_one_lease(cluster):
    endpoint, workers, gateway = cluster
    httpx.post(gateway.address + "/v1/completions", timeout=60,
               json={"model": "demo", "prompt": list(range(100, 150)), "max_tokens": 2})
    time.sleep(1.2)  # summaries are written at most once a second

    async def read(client):
        records = {kv.key.decode(): (json.loads(kv.value), kv.lease) for kv in
                   await client.get_prefix(registry.WORKERS.encode())}
        summaries = {kv.key.decode(): (json.loads(kv.value), kv.lease) for kv in
                     await client.get_prefix(registry.KV.encode())}
        return records, summaries

    records, summaries = _etcd(endpoint, read)
    ids = {w.worker_id for w in workers[:3] if w.process.poll() is None}
    assert {k.removeprefix(registry.WORKERS) for k in records} >= ids
    for worker in workers[:3]:
        record, lease = records[registry.WORKERS + worker.worker_id]
        assert record["address"] == worker.address and record["model"] == "demo"
        assert record["pool"] == "default" and len(record["model_digest"]) == 64
        assert record["capacity"] == {"max_num_seqs": 8, "num_blocks": 128, "block_size": 16, "max_model_len": 256}
        assert lease != 0
    cached = [s for s, _ in summaries.values() if s["num_cached_blocks"] >= 3]
    assert cached and all(len(s["keys"]) == s["num_cached_blocks"] and len(s["keys"][0]) == 64 for s in cached)
    # Same lease for a worker's record and summary: both vanish together.
    for key, (summary, lease) in summaries.items():
        assert records[registry.WORKERS + key.removeprefix(registry.KV)][1] == lease


def _stream(url: str, body: dict, out: list, started: threading.Event | None = None) -> None:
    tokens, error, finish = 0, None, None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
        status = response.status_code
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
                continue
            choice = event["choices"][0]
            tokens += 1 if choice["text"] or choice["finish_reason"] is None else 0
            finish = choice["finish_reason"] or finish
            if started is not None:
                started.set()
    out.append((status, finish, error, tokens))


def test_sigkill_under_32_streams_loses_no_unstarted_request_and_a_new_worker_joins(cluster):
    endpoint, workers, gateway = cluster
    url = gateway.address
    retries_before = _metric(url, "tessera:gateway_retries_total")
    errors_before = _metric(url, "tessera:gateway_stream_errors_total")
    body = {"model": "demo", "max_tokens": 160, "temperature": 0, "ignore_eos": True, "stream": True}
    results: list = []
    first = threading.Event()
    threads = [threading.Thread(target=_stream, args=(url, {**body, "prompt": f"{PROMPTS[i % 4]} {i}"}, results,
                                                      first)) for i in range(32)]
    for t in threads:
        t.start()
    assert first.wait(60)
    time.sleep(0.5)
    victim = workers[0]
    victim.kill()  # SIGKILL: no goodbye, the lease lingers until its TTL
    for t in threads:
        t.join(180)
    assert len(results) == 32 and all(status == 200 for status, *_ in results)
    errored = [r for r in results if r[2] is not None]
    finished = [r for r in results if r[2] is None]
    assert all(finish == "length" for _, finish, _, _ in finished)
    assert len(errored) >= 1  # the victim was streaming some
    assert len(errored) <= 8  # at most its running streams (max_num_seqs); the rest were retried or elsewhere
    assert all("lost mid-stream" in e["message"] and tokens >= 1 for _, _, e, tokens in errored)  # had started
    assert _metric(url, "tessera:gateway_stream_errors_total") - errors_before == len(errored)
    retries = _metric(url, "tessera:gateway_retries_total") - retries_before
    print(f"\nSIGKILL: {len(errored)} error events, {retries:.0f} retried requests")
    assert retries >= 0
    # The victim's record goes with its lease (TTL 2 s).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        listed = _etcd(endpoint, lambda c: c.get_prefix(registry.WORKERS.encode()))
        if len(list(listed)) == 2:
            break
        time.sleep(0.2)
    assert len(list(listed)) == 2

    # A new worker: from its registration, within 2 s it runs requests.
    newcomer = start_worker(None, endpoint)
    workers.append(newcomer)
    registered = time.monotonic()  # it registers before printing that it listens
    label = f'pool="default",worker="{newcomer.worker_id}"'
    served_at = None
    while time.monotonic() - registered < 10 and served_at is None:
        replies = []
        threads = [threading.Thread(target=lambda: replies.append(httpx.post(
            url + "/v1/completions", json={"model": "demo", "prompt": "Hello", "max_tokens": 2}, timeout=30)))
            for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if _metric(url, "tessera:gateway_requests_total", label) > 0:
            served_at = time.monotonic() - registered
    assert served_at is not None and served_at < 2.0, served_at
