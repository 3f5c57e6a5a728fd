"""Gateway overhead on this machine: one real `tessera worker` on the demo model, real etcd, one
`tessera gateway`; the same greedy requests straight to the worker (gRPC, `RemoteEngine`) and
through the gateway (HTTP/SSE + routing + gRPC), rounds alternating so both see the same load.
With `--serve`, also HTTP/SSE straight to a `tessera serve` of the same model: the API's own cost
without the gateway hop. Prints a markdown section for perf/results/gateway_overhead_cpu.md.

    .venv/bin/python -m perf.gateway_overhead [--rounds 6] [--serve] [--profile gateway.svg]

`--profile` records the gateway process with py-spy (`pip install py-spy`) during the gateway
rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import time

import httpx

from runtime.request import SamplingParams
from serving.remote_engine import remote_engine
from tests.helpers.cluster import start_etcd, start_gateway, start_serve, start_worker

TOKENS = 64
# Every sampling field the HTTP path would otherwise take from generation_config.json (the demo
# model's top_p 0.95 costs the worker a sort per step), so both paths run the same steps.
GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "ignore_eos": True}


def prompt(i: int) -> list[int]:
    return [5 + i % 200, 7, 9]  # shorter than a block: no prefix-cache hits on either path


async def gateway_round(client: httpx.AsyncClient, streams: int, base: int) -> tuple[list[float], float]:
    async def one(i: int) -> float:
        start, first, chunks = time.perf_counter(), None, 0
        body = {"model": "demo", "prompt": prompt(base + i), "max_tokens": TOKENS, "stream": True, **GREEDY}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    first = first or time.perf_counter() - start
                    chunks += 1
        assert chunks >= 1, "no chunk streamed"
        return first

    start = time.perf_counter()
    ttfts = await asyncio.gather(*(one(i) for i in range(streams)))
    return list(ttfts), streams * TOKENS / (time.perf_counter() - start)


async def direct_round(engine, streams: int, base: int) -> tuple[list[float], float]:
    async def one(i: int) -> float:
        start, first, tokens = time.perf_counter(), None, 0
        request = engine.make_request(prompt(base + i), SamplingParams(max_tokens=TOKENS, **GREEDY))
        async for output in engine.stream(request):
            first = first or time.perf_counter() - start
            tokens += len(output.outputs[0].token_ids)
        assert tokens == TOKENS, tokens
        return first

    start = time.perf_counter()
    ttfts = await asyncio.gather(*(one(i) for i in range(streams)))
    return list(ttfts), streams * TOKENS / (time.perf_counter() - start)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (0 without a pid)."""
    if pid is None:
        return 0.0
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(worker: str, gateway: str, concurrencies: tuple[int, ...], rounds: int, profile=None,
                  gateway_pid: int | None = None, serve: str | None = None) -> dict:
    """Per concurrency: {path: (TTFTs, mean tokens/s)} for "direct", "gateway" and (with `serve`)
    "serve", plus the gateway's CPU seconds per streamed token under "gateway_cpu"."""
    results = {}
    async with contextlib.AsyncExitStack() as stack:
        engine = await stack.enter_async_context(remote_engine(worker))
        clients = {"gateway": await stack.enter_async_context(httpx.AsyncClient(base_url=gateway, timeout=120))}
        if serve:
            clients["serve"] = await stack.enter_async_context(httpx.AsyncClient(base_url=serve, timeout=120))
        for c in concurrencies:  # warm every path (compiles, connections)
            await direct_round(engine, c, 0)
            for client in clients.values():
                await gateway_round(client, c, 0)
        spy = profile() if profile else None
        for c in concurrencies:
            ttfts, rates, cpu = {"direct": [], **{k: [] for k in clients}}, {"direct": [], **{k: [] for k in clients}}, 0.0
            for r in range(rounds):
                t, rate = await direct_round(engine, c, r * c)
                ttfts["direct"] += t
                rates["direct"].append(rate)
                for name, client in clients.items():
                    before = cpu_seconds(gateway_pid)
                    t, rate = await gateway_round(client, c, r * c)
                    if name == "gateway":
                        cpu += cpu_seconds(gateway_pid) - before
                    ttfts[name] += t
                    rates[name].append(rate)
            results[c] = {name: (ttfts[name], statistics.mean(rates[name])) for name in ttfts}
            results[c]["gateway_cpu"] = cpu / (rounds * c * TOKENS)
        if spy is not None:
            spy.wait(60)
    return results


def cpu_model() -> str:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def report(results: dict, title: str) -> str:
    p50 = statistics.median
    serve = any("serve" in r for r in results.values())
    head = ("| streams | TTFT P50 direct | TTFT P50 gateway | added | tokens/s direct | tokens/s gateway | "
            "gateway / direct | gateway CPU per token |")
    head += " TTFT P50 `tessera serve` | tokens/s `tessera serve` |" if serve else ""
    lines = [f"### {title}\n", head, "|" + "---|" * (head.count("|") - 1)]
    for c, r in results.items():
        (d_ttft, d_tps), (g_ttft, g_tps) = r["direct"], r["gateway"]
        line = (f"| {c} | {p50(d_ttft) * 1e3:.1f} ms | {p50(g_ttft) * 1e3:.1f} ms | "
                f"{(p50(g_ttft) - p50(d_ttft)) * 1e3:+.1f} ms | {d_tps:.0f} | {g_tps:.0f} | {g_tps / d_tps:.0%} | "
                f"{r['gateway_cpu'] * 1e3:.2f} ms |")
        if serve:
            s_ttft, s_tps = r["serve"]
            line += f" {p50(s_ttft) * 1e3:.1f} ms | {s_tps:.0f} |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--profile", help="py-spy flame graph of the gateway (svg), or .txt for raw stacks")
    parser.add_argument("--title", default="gateway vs direct")
    parser.add_argument("--worker", help="measure a running worker (host:port) ...")
    parser.add_argument("--gateway", help="... behind this running gateway (URL) instead of starting them")
    parser.add_argument("--gateway-pid", type=int, help="the running gateway's process, for its CPU time")
    parser.add_argument("--serve", action="store_true",
                        help="also measure HTTP/SSE straight to a `tessera serve` of the same model (no gateway)")
    args = parser.parse_args()
    concurrencies = tuple(int(c) for c in args.concurrency.split(","))
    if args.worker:
        results = asyncio.run(measure(args.worker, args.gateway, concurrencies, args.rounds, None, args.gateway_pid))
        print(report(results, args.title))
        return
    etcd, endpoint = start_etcd()
    worker = gateway = serve = None
    try:
        worker = start_worker(None, endpoint, timeout=300)
        gateway = start_gateway(endpoint)
        serve = start_serve() if args.serve else None
        time.sleep(1.0)  # the gateway dials the worker after /ready

        def profile():
            fmt = "raw" if args.profile.endswith(".txt") else "flamegraph"
            return subprocess.Popen([".venv/bin/py-spy", "record", "--pid", str(gateway.process.pid), "--rate", "200",
                                     "--duration", "20", "--format", fmt, "--output", args.profile, "--nonblocking"])

        results = asyncio.run(measure(worker.address, gateway.address, concurrencies, args.rounds,
                                      profile if args.profile else None, gateway.process.pid,
                                      serve.address if serve else None))
    finally:
        if serve is not None:
            serve.stop()
        if gateway is not None:
            gateway.stop()
        if worker is not None:
            worker.stop()
        etcd.stop()
    print(f"Machine: {cpu_model()} (lscpu), shared; {time.strftime('%Y-%m-%d %H:%M')}; {args.rounds} rounds "
          f"per concurrency, direct and gateway alternating; {TOKENS} tokens per request, greedy.\n")
    print(report(results, args.title))


if __name__ == "__main__":
    main()
