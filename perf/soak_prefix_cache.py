"""Soak: 20,000 requests with shared prefixes, prefix caching on and a small KV cache, against a
`tessera serve` process; its resident memory (RSS) after 20,000 must be within 2% of after 5,000.

    .venv/bin/python perf/soak_prefix_cache.py [--requests 20000] [--out perf/results/soak_prefix_cache.md]
    .venv/bin/python perf/soak_prefix_cache.py --tree /path/to/an/older/checkout   # the same soak, older code

Why this shape: the issue found the block manager's events appended for ever with caching on
(+5.4 MB per 1,000 requests with 256 blocks). Here 24 prefixes of 3 blocks each (72 blocks)
compete for a 48-block cache, and each request adds a unique 20-token suffix (a block of its
own, stored and later evicted) and asks for 2 tokens, so every request stores and evicts
blocks and emits events. Prompts are token ids, so the prefixes are exact. 16 clients keep
the engine busy over keep-alive connections (a lean asyncio HTTP/1.1 client: the client
shares the machine's cores with the server).

RSS is read from /proc/PID/status of the server process (the tokenizer workers are separate
processes, reported apart). The first 5,000 requests warm allocator pools and caches; that
reading is the baseline the later ones are compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from perf.load import free_port, start_server, stop_server  # noqa: E402

MODEL_DIR = REPO / ".cache" / "perf-soak-model"
SHAPE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, max_position_embeddings=256)
NUM_PREFIXES, PREFIX_TOKENS, SUFFIX_TOKENS, MAX_TOKENS = 24, 48, 20, 2
SERVER_FLAGS = ["--allow-unsigned", "--num-blocks", "48", "--block-size", "16", "--max-num-seqs", "16",
                "--max-num-batched-tokens", "256", "--token-buckets", "16,64,256", "--max-model-len", "256",
                "--max-queue", "64", "--served-model-name", "soak", "--log-level", "warning"]
CLIENTS = 16
CHECKPOINTS = (5_000, 10_000, 15_000, 20_000)


def build_model() -> Path:
    if not (MODEL_DIR / "config.json").is_file():
        from tests.helpers.tiny_checkpoint import build_checkpoint

        build_checkpoint(MODEL_DIR, "llama", **SHAPE)
    return MODEL_DIR


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def children_rss_kib(pid: int) -> int:
    total = 0
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for cpid in child.read_text().split():
            try:
                total += rss_kib(int(cpid))
            except (FileNotFoundError, RuntimeError):
                pass
    return total


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


class Client:
    """One keep-alive HTTP/1.1 connection posting JSON and reading Content-Length answers."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        payload = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                          f"content-length: {len(payload)}\r\n\r\n".encode() + payload)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        answer = await self.reader.readexactly(length)
        if b"connection: close" in head.lower():
            self.writer.close()
            self.writer = None
        return status, answer


def workload(total: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 500) for _ in range(PREFIX_TOKENS)] for _ in range(NUM_PREFIXES)]
    weights = [1 / (i + 1) for i in range(NUM_PREFIXES)]  # a few hot prefixes, a long tail that evicts
    return [rng.choices(prefixes, weights)[0] + [rng.randrange(3, 500) for _ in range(SUFFIX_TOKENS)]
            for _ in range(total)]


async def soak(port: int, pid: int, total: int) -> dict:
    prompts = workload(total)
    next_index, done, errors = 0, 0, []
    readings: dict[int, tuple[int, int]] = {}
    started = time.perf_counter()

    async def client() -> None:
        nonlocal next_index, done
        connection = Client(port)
        while next_index < total:
            index = next_index
            next_index += 1
            status, answer = await connection.post("/v1/completions", {
                "model": "soak", "prompt": prompts[index], "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True})
            if status != 200:
                errors.append(f"{status}: {answer[:200]!r}")
            done += 1
            if done in CHECKPOINTS and done not in readings:
                readings[done] = (rss_kib(pid), children_rss_kib(pid))
                print(f"{done} requests, {time.perf_counter() - started:.0f}s: server RSS {readings[done][0]} KiB",
                      flush=True)

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return {"readings": readings, "errors": errors, "seconds": time.perf_counter() - started}


def metrics(port: int) -> dict[str, float]:
    import httpx

    values = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line.startswith("tessera:") and "_created" not in line:
            name = line.split("{", 1)[0].split(" ", 1)[0]
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def report(result: dict, counters: dict, tree: Path, total: int) -> str:
    readings = result["readings"]
    if CHECKPOINTS[0] not in readings:  # a short smoke run (--requests below the first checkpoint)
        return f"{total:,} requests in {result['seconds']:.0f} s, {len(result['errors'])} errors; RSS is read " \
               f"from {CHECKPOINTS[0]:,} requests on, so there is nothing to compare."
    base = readings[CHECKPOINTS[0]][0]
    last = readings[max(readings)][0]
    growth = (last - base) / base
    queries = counters.get("tessera:prefix_cache_queries_total", 0.0)
    hits = counters.get("tessera:prefix_cache_hits_total", 0.0)
    rows = "\n".join(f"| {n:,} | {rss / 1024:.1f} | {(rss - base) / base:+.2%} | {kids / 1024:.1f} |"
                     for n, (rss, kids) in sorted(readings.items()))
    verdict = "within" if abs(growth) <= 0.02 else "NOT within"
    return f"""Code: `{tree}` at {_commit(tree)}. CPU: {cpu_model()} ({os.cpu_count()} cores), load average
{os.getloadavg()[0]:.1f} at the end. {total:,} requests in {result['seconds']:.0f} s, {len(result['errors'])} errors.
Server: `{' '.join(SERVER_FLAGS)}`; random llama 64x2 layers; {CLIENTS} keep-alive clients;
prompts {PREFIX_TOKENS}-token prefix (one of {NUM_PREFIXES}, Zipf-weighted) + {SUFFIX_TOKENS} unique tokens,
{MAX_TOKENS} tokens out. Prefix cache hit rate {hits / max(queries, 1):.1%}; KV events dropped from the ring
{counters.get('tessera:kv_events_dropped_total', float('nan')):,.0f}.

| requests | server RSS (MiB) | vs. 5,000 | tokenizer workers' RSS (MiB) |
|---|---|---|---|
{rows}

RSS after {max(readings):,} is **{growth:+.2%}** of RSS after {CHECKPOINTS[0]:,}: {verdict} 2%.
"""


def _commit(tree: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "(not a git checkout)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=CHECKPOINTS[-1])
    parser.add_argument("--tree", type=Path, default=REPO, help="source tree whose `tessera serve` runs")
    parser.add_argument("--out", type=Path, help="append the result (markdown) to this file")
    args = parser.parse_args()
    port = free_port()
    process = start_server(port, ["--model", str(build_model()), *SERVER_FLAGS], tree=args.tree.resolve())
    try:
        result = asyncio.run(soak(port, process.pid, args.requests))
        counters = metrics(port)
    finally:
        stop_server(process)
    text = report(result, counters, args.tree.resolve(), args.requests)
    print(text)
    if result["errors"]:
        print("first errors:", *result["errors"][:5], sep="\n  ")
    if args.out:
        with args.out.open("a") as f:
            f.write(text + "\n")
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
