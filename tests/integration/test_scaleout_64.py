"""64 worker processes (the real gRPC server and etcd registration over a simulated engine,
perf/sim_engine.py), real etcd, one `tessera gateway`: pool weights 3:1 split traffic within
5%, and draining a pool moves all new traffic within 2 s."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.helpers.cluster import put_pool, start_etcd, start_gateway, start_sim_workers, stop_cluster


def _pool_counts(url: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("tessera:gateway_requests_total{"):
            pool = line.split('pool="', 1)[1].split('"', 1)[0]
            counts[pool] = counts.get(pool, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


async def _send(url: str, count: int, concurrency: int = 16) -> None:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async def one(i: int) -> None:
            async with limit:
                reply = await client.post("/v1/completions", json={"model": "demo", "prompt": [1 + i % 4000, 2, 3],
                                                                   "max_tokens": 1})
                assert reply.status_code == 200, reply.text

        await asyncio.gather(*(one(i) for i in range(count)))


@pytest.fixture(scope="module")
def cluster64():
    etcd, endpoint = start_etcd()
    workers, gateway = [], None
    try:
        put_pool(endpoint, "east", 3)
        put_pool(endpoint, "west", 1)
        workers = start_sim_workers(endpoint, {"east": 32, "west": 32})
        gateway = start_gateway(endpoint)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # listed, then dialled and polled: 64 records come before 64 handshakes
            hints = httpx.get(gateway.address + "/v1/autoscale", timeout=10).json()
            if (sum(p["replicas"] for p in hints["pools"].values()) == 64
                    and all(w["healthy"] and not w["stale"] for w in hints["workers"].values())):
                break
            time.sleep(0.2)
        yield endpoint, workers, gateway
    finally:
        stop_cluster(gateway, workers, etcd)


def test_64_workers_register_and_pool_weights_split_traffic_3_to_1(cluster64):
    _, workers, gateway = cluster64
    # On a loaded machine a worker's numbers can be a refresh late: poll until every one is fresh.
    deadline = time.monotonic() + 20
    while True:
        hints = httpx.get(gateway.address + "/v1/autoscale", timeout=10).json()
        fresh = all(w["healthy"] and not w["stale"] for w in hints["workers"].values())
        if fresh or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {p: v["replicas"] for p, v in hints["pools"].items()} == {"east": 32, "west": 32}
    assert fresh, [name for name, w in hints["workers"].items() if not (w["healthy"] and not w["stale"])]
    before = _pool_counts(gateway.address)
    asyncio.run(_send(gateway.address, 400))
    after = _pool_counts(gateway.address)
    east = after.get("east", 0) - before.get("east", 0)
    west = after.get("west", 0) - before.get("west", 0)
    assert east + west == 400
    assert abs(east / 400 - 0.75) <= 0.05, (east, west)


def test_draining_a_pool_moves_all_new_traffic_within_2_s(cluster64):
    endpoint, _, gateway = cluster64
    put_pool(endpoint, "west", 1, drain=True)
    drained_at = time.monotonic()
    moved_after = None
    while time.monotonic() - drained_at < 5:
        before = _pool_counts(gateway.address).get("west", 0)
        asyncio.run(_send(gateway.address, 8, concurrency=8))
        if _pool_counts(gateway.address).get("west", 0) == before:
            moved_after = moved_after or time.monotonic() - drained_at
        else:
            moved_after = None
    assert moved_after is not None and moved_after < 2.0, moved_after
    put_pool(endpoint, "west", 1)
