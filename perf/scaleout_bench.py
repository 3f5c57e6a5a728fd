"""Scale-out figures on this machine: 64 simulated workers (perf/sim_worker.py) on real etcd
behind one `tessera gateway`. Prints a markdown section for perf/results/scaleout_cpu.md.

  - routing decision time (the gateway's tessera:gateway_routing_seconds, over 64 workers)
  - etcd write rate (etcd's own etcd_mvcc_put_total), idle and under load
  - gateway overhead: TTFT and streamed tokens/s through the gateway (HTTP/SSE + routing +
    gRPC) vs straight to the same worker over gRPC, same concurrency, in one run

    .venv/bin/python -m perf.scaleout_bench
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import time

import httpx

from runtime.request import SamplingParams
from serving.remote_engine import remote_engine
from tests.helpers.cluster import put_pool, start_etcd, start_gateway, start_sim_workers, stop_cluster

STREAMS, TOKENS, ROUNDS = 8, 64, 4


def etcd_puts(endpoint: str) -> float:
    text = httpx.get(f"http://{endpoint}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("etcd_mvcc_put_total"))


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def through_gateway(url: str) -> tuple[list[float], float]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def one(i: int) -> tuple[float, int]:
            start, first, tokens = time.perf_counter(), None, 0
            body = {"model": "demo", "prompt": [1 + i, 2, 3], "max_tokens": TOKENS, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        first = first or time.perf_counter() - start
                        tokens += 1
            return first, tokens

        return await _rounds(one)


async def direct(address: str) -> tuple[list[float], float]:
    async with remote_engine(address) as engine:
        async def one(i: int) -> tuple[float, int]:
            start, first, tokens = time.perf_counter(), None, 0
            request = engine.make_request([1 + i, 2, 3], SamplingParams(max_tokens=TOKENS))
            async for output in engine.stream(request):
                first = first or time.perf_counter() - start
                tokens += len(output.outputs[0].token_ids)
            return first, tokens

        return await _rounds(one)


async def _rounds(one) -> tuple[list[float], float]:
    ttfts, tokens, seconds = [], 0, 0.0
    for r in range(ROUNDS):
        start = time.perf_counter()
        results = await asyncio.gather(*(one(r * STREAMS + i) for i in range(STREAMS)))
        seconds += time.perf_counter() - start
        ttfts += [t for t, _ in results]
        tokens += sum(n for _, n in results)
    return ttfts, tokens / seconds


def main() -> None:
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    etcd, endpoint = start_etcd()
    workers, gateway = [], None
    try:
        put_pool(endpoint, "east", 3)
        put_pool(endpoint, "west", 1)
        workers = start_sim_workers(endpoint, {"east": 32, "west": 32})
        gateway = start_gateway(endpoint)
        time.sleep(3)
        puts, t = etcd_puts(endpoint), time.monotonic()
        time.sleep(10)
        idle_rate = (etcd_puts(endpoint) - puts) / (time.monotonic() - t)

        async def load() -> None:
            limit = asyncio.Semaphore(32)
            async with httpx.AsyncClient(base_url=gateway.address, timeout=60) as client:
                async def one(i: int) -> None:
                    async with limit:
                        await client.post("/v1/completions", json={"model": "demo", "max_tokens": 4,
                                                                   "prompt": [(i * 16 + k) % 4000 for k in range(64)]})

                await asyncio.gather(*(one(i) for i in range(1000)))

        puts, t = etcd_puts(endpoint), time.monotonic()
        asyncio.run(load())
        load_s = time.monotonic() - t
        load_rate = (etcd_puts(endpoint) - puts) / load_s
        routing_mean = (metric(gateway.address, "tessera:gateway_routing_seconds_sum")
                        / metric(gateway.address, "tessera:gateway_routing_seconds_count"))

        # Overhead: all traffic to one worker (its own pool), the others drained.
        solo = workers[0]
        put_pool(endpoint, "east", 3, drain=True)
        put_pool(endpoint, "west", 1, drain=True)
        put_pool(endpoint, "solo", 1)
        subprocess_env_note = "pool solo = one worker, east and west drained"
        import serving.registry as registry

        async def move() -> None:
            async with registry.connect(endpoint) as client:
                record = json.loads((await client.get((registry.WORKERS + solo.worker_id).encode())).value)
                record["pool"] = "solo"
                await client.put((registry.WORKERS + solo.worker_id).encode(), json.dumps(record).encode())

        asyncio.run(move())  # without a lease: the bench removes it at the end with etcd
        time.sleep(1.5)
        asyncio.run(through_gateway(gateway.address))  # warm
        direct_ttft, direct_tps = asyncio.run(direct(solo.address))
        gw_ttft, gw_tps = asyncio.run(through_gateway(gateway.address))
    finally:
        stop_cluster(gateway, workers, etcd)
    p50 = statistics.median
    print(f"## 64 simulated workers, one gateway ({time.strftime('%Y-%m-%d')})\n")
    print(f"Machine: {model}, {len([l for l in cpu.splitlines() if l.startswith('CPU(s)')]) and cpu.split('CPU(s):')[1].split()[0]} CPUs "
          "(shared with other developers' jobs); etcd 3.4 (Debian), one member, loopback.\n")
    print("| figure | value |\n|---|---|")
    print(f"| routing decision, mean over the load's 1000 requests, 64 workers | {routing_mean * 1e6:.0f} us |")
    print(f"| etcd puts/s, idle (64 workers) | {idle_rate:.2f} |")
    print(f"| etcd puts/s, under load (1000 requests in {load_s:.1f} s, 64-token prompts) | {load_rate:.1f} |")
    print(f"| TTFT P50, straight to one worker (gRPC), {STREAMS} streams x {TOKENS} tokens | {p50(direct_ttft) * 1e3:.1f} ms |")
    print(f"| TTFT P50, through the gateway (HTTP/SSE), same worker, same load | {p50(gw_ttft) * 1e3:.1f} ms |")
    print(f"| added TTFT at P50 | {(p50(gw_ttft) - p50(direct_ttft)) * 1e3:.1f} ms |")
    print(f"| streamed tokens/s, direct / through the gateway | {direct_tps:.0f} / {gw_tps:.0f} ({gw_tps / direct_tps:.0%}) |")
    print(f"\n({subprocess_env_note}; the simulated worker's decode step is 8 ms.)")


if __name__ == "__main__":
    main()
