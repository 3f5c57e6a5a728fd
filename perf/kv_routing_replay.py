"""KV-aware routing vs round-robin: a slice of the Mooncake conversation trace
(../shared/traces/conversation_trace.jsonl) replayed over 4 real `tessera worker`s on the demo
model behind one gateway per policy, on real etcd. Prints a markdown section for
perf/results/kv_routing_cpu.md.

The trace gives each request its prompt as `hash_ids`, one per 512-token block, equal ids
meaning an equal prefix. Here each hash id becomes `TOKENS_PER_HASH` fixed pseudo-random token
ids (so a shared hash id is a shared prefix of whole KV blocks), the prompt is clipped to
`MAX_HASHES` ids to fit the demo model's context, and the output to `MAX_OUTPUT` tokens.
Requests go in trace order, at most `CONCURRENCY` at a time. Each policy runs with its own
cache salt, so the second run finds nothing the first one cached.

    .venv/bin/python -m perf.kv_routing_replay [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from perf.gateway_overhead import cpu_model
from tests.helpers.cluster import start_etcd, start_gateway, start_worker

TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "conversation_trace.jsonl"
TOKENS_PER_HASH = 32  # two 16-token KV blocks per trace block
MAX_HASHES = 7  # 224 prompt tokens: with MAX_OUTPUT, within the workers' 256-token context
MAX_OUTPUT = 8
CONCURRENCY = 8
VOCAB = 4000  # ids below the demo model's special tokens


@dataclass(frozen=True)
class TraceRequest:
    hash_ids: tuple[int, ...]
    output_tokens: int

    def prompt(self) -> list[int]:
        return [t for h in self.hash_ids for t in hash_tokens(h)]


def hash_tokens(hash_id: int) -> list[int]:
    rng = random.Random(hash_id)  # the same id gives the same tokens, run after run
    return [rng.randrange(10, VOCAB) for _ in range(TOKENS_PER_HASH)]


def load_trace(path: Path, start: int, count: int) -> list[TraceRequest]:
    rows = [json.loads(line) for line in path.read_text().splitlines()[start:start + count]]
    return [TraceRequest(tuple(r["hash_ids"][:MAX_HASHES]), max(1, min(r["output_length"], MAX_OUTPUT)))
            for r in rows]


def ideal_hit_rate(requests: list[TraceRequest]) -> float:
    """Prompt tokens a single unbounded cache would find: the bound for any routing."""
    seen, hit, total = set(), 0, 0
    for r in requests:
        k = 0
        while k < len(r.hash_ids) and r.hash_ids[:k + 1] in seen:
            k += 1
        hit += k * TOKENS_PER_HASH
        total += len(r.hash_ids) * TOKENS_PER_HASH
        seen.update(r.hash_ids[:i] for i in range(1, len(r.hash_ids) + 1))
    return hit / total


def shared_root_rate(requests: list[TraceRequest]) -> float:
    """Prompt tokens of the first hash id, when the slice's requests all start with the same one."""
    roots = {r.hash_ids[0] for r in requests}
    total = sum(len(r.hash_ids) for r in requests) * TOKENS_PER_HASH
    return (len(requests) - 1) * TOKENS_PER_HASH / total if len(roots) == 1 else 0.0


async def replay(url: str, requests: list[TraceRequest], salt: str) -> dict:
    limit = asyncio.Semaphore(CONCURRENCY)
    ttfts, prompt_tokens, cached_tokens = [], 0, 0

    async def one(client: httpx.AsyncClient, r: TraceRequest) -> None:
        nonlocal prompt_tokens, cached_tokens
        body = {"model": "demo", "prompt": r.prompt(), "max_tokens": r.output_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "cache_salt": salt}
        async with limit:
            start, first = time.perf_counter(), None
            async with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200, await response.aread()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and first is None:
                        first = time.perf_counter() - start
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                        prompt_tokens += usage["prompt_tokens"]
                        cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            ttfts.append(first)

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await asyncio.gather(*(one(client, r) for r in requests))
    return {"hit_rate": cached_tokens / prompt_tokens, "ttft_mean": statistics.mean(ttfts),
            "ttft_p50": statistics.median(ttfts), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--start", type=int, default=0, help="first trace line of the slice")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--num-blocks", type=int, default=2048,
                        help="KV blocks per worker: the trace reuses a conversation ~150 requests later")
    args = parser.parse_args()
    requests = load_trace(TRACE, args.start, args.requests)
    etcd, endpoint = start_etcd()
    workers, gateways, results = [], [], {}
    try:
        workers = [start_worker(None, endpoint, timeout=600, env={"TESSERA_NUM_BLOCKS": str(args.num_blocks)}) for _ in range(args.workers)]
        for policy in ("round_robin", "kv"):
            gateways.append(start_gateway(endpoint, env={"TESSERA_ROUTE_POLICY": policy}))
        time.sleep(1.5)  # each gateway dials every worker
        for policy, gateway in zip(("round_robin", "kv"), gateways):
            results[policy] = asyncio.run(replay(gateway.address, requests, salt=f"replay-{policy}"))
    finally:
        for gateway in gateways:
            gateway.stop()
        for worker in workers:
            worker.stop()
        etcd.stop()
    print(f"## KV-aware routing vs round-robin ({time.strftime('%Y-%m-%d')})\n")
    print(f"Machine: {cpu_model()} (lscpu), shared. Trace: conversation_trace.jsonl lines {args.start}-"
          f"{args.start + args.requests - 1}, {TOKENS_PER_HASH} tokens per hash id, prompts clipped to "
          f"{MAX_HASHES * TOKENS_PER_HASH} tokens, outputs to {MAX_OUTPUT}; {args.workers} workers "
          f"(demo model, {args.num_blocks} KV blocks of 16 tokens each), {CONCURRENCY} requests in flight, greedy.\n")
    print("| policy | prefix-cache hit rate (cached / prompt tokens) | mean TTFT | P50 TTFT | wall time |")
    print("|---|---|---|---|---|")
    for policy, r in results.items():
        print(f"| {policy} | {r['hit_rate']:.1%} | {r['ttft_mean'] * 1e3:.0f} ms | {r['ttft_p50'] * 1e3:.0f} ms | "
              f"{r['seconds']:.1f} s |")
    print(f"\nBound: one unbounded cache would find {ideal_hit_rate(requests):.1%} of the prompt tokens "
          f"({shared_root_rate(requests):.1%} being the first hash id, which every request of the slice shares).")


if __name__ == "__main__":
    main()
