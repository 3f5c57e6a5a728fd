"""HTTP load test: concurrent streaming clients against `tessera serve`, beside the in-process engine.

    .venv/bin/python perf/load.py [--clients 64] [--seconds 60] [--out perf/results/http_load_cpu.md]
    .venv/bin/python perf/load.py --chats 16 [--seconds 60]

Load mode: a small random checkpoint (built once into .cache/perf-load-model) is served by a
`tessera serve` subprocess; N clients each stream completions back to back for T seconds,
and what is in flight at T is cut off there: throughput counts the tokens that arrived in
the window (streams carry their usage in every chunk), so it does not depend on how many
whole requests fit in it. Reported: errors, time to first token and inter-token latency
P50/P99, aggregate tok/s, and the same workload through the in-process AsyncEngine (no
HTTP), before and after the HTTP run; HTTP / in-process is the cost of the HTTP path
(aim: >= 0.9).

Chat mode: `tessera serve` with its default model (models/demo, or the random fallback),
N concurrent chat streams for T seconds; every stream must decode at >= 8 tok/s.

The clients speak HTTP/1.1 over asyncio streams with a minimal SSE reader, so that the load
generator, which shares the machine's cores with the server, costs as little as possible.
Everything runs on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL_DIR = REPO / ".cache" / "perf-load-model"
# ~20M parameters: big enough that the engine's step, not the HTTP layer, sets the pace.
SHAPE = dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1408, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=512)
PROMPT_TOKENS, MAX_TOKENS, MAX_MODEL_LEN = 32, 64, 256
TOKEN_BUCKETS = "64,256"
MIN_CHAT_TOK_S = 8.0


@dataclass
class Stream:
    ok: bool = True
    error: str = ""
    start: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0
    cut: bool = False  # still running at the deadline (its tokens so far count)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def decode_tok_s(self) -> float | None:
        t = self.chunk_times
        return (self.tokens - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else None

    @property
    def e2e_tok_s(self) -> float | None:
        return self.tokens / (self.chunk_times[-1] - self.start) if self.chunk_times else None


# -- a lean streaming client ----------------------------------------------------------------


async def stream_once(host: str, port: int, path: str, body: dict, deadline: float,
                      headers: dict[str, str] | None = None, tls: bool = False) -> Stream:
    """POST with `stream: true` and usage in every chunk; each chunk with text is one arrival.
    At `deadline` the connection is dropped (the server aborts the request): only tokens that
    arrived by then count. `headers` are sent as given (e.g. Authorization)."""
    result = Stream(start=time.perf_counter())
    payload = json.dumps(body).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    try:
        reader, writer = await asyncio.open_connection(host, port, ssl=True if tls else None)
    except OSError as e:
        return Stream(ok=False, error=f"connect: {e}")
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        status = int((await _before(reader.readline(), deadline)).split()[1])
        while (await _before(reader.readline(), deadline)) not in (b"\r\n", b""):
            pass
        if status != 200:
            return Stream(ok=False, error=f"HTTP {status}: {(await reader.read(300))!r}")
        done = False
        while not done:
            size = int((await _before(reader.readline(), deadline)).strip() or b"0", 16)
            if size == 0:
                break
            chunk = await _before(reader.readexactly(size + 2), deadline)
            now = time.perf_counter()
            for event in chunk.split(b"\n\n"):
                if not event.startswith(b"data: "):
                    continue
                data = event[6:]
                if data == b"[DONE]":
                    done = True
                    continue
                if data.startswith(b'{"error"'):
                    return Stream(ok=False, error=data.decode()[:300])
                at = data.rfind(b'"completion_tokens":')
                if at >= 0:
                    result.tokens = int(data[at + 20:data.index(b",", at)])
                if b'"choices":[]' not in data:
                    result.chunk_times.append(now)
        if not done:
            result.ok, result.error = False, "stream ended without [DONE]"
    except TimeoutError:
        result.cut = True
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        result.ok, result.error = False, f"{type(e).__name__}: {e}"
    finally:
        writer.close()
    return result


async def _before(awaitable, deadline: float):
    return await asyncio.wait_for(awaitable, max(deadline - time.perf_counter(), 0.0))


async def run_clients(make_request, clients: int, seconds: float) -> tuple[list[Stream], float]:
    """`clients` loops, each starting requests back to back for `seconds`; what is in flight at
    the end is cut there. (streams, the window's length)."""
    start = time.perf_counter()
    deadline = start + seconds

    async def client(index: int) -> list[Stream]:
        done, number = [], 0
        while time.perf_counter() < deadline:
            done.append(await make_request(index, number, deadline))
            number += 1
        return done

    per_client = await asyncio.gather(*(client(i) for i in range(clients)))
    return [s for streams in per_client for s in streams], seconds


# -- the server and the in-process engine ---------------------------------------------------


def build_model() -> Path:
    if not (MODEL_DIR / "config.json").is_file():
        from tests.helpers.tiny_checkpoint import build_checkpoint

        build_checkpoint(MODEL_DIR, "llama", **SHAPE)
    return MODEL_DIR


def start_server(port: int, flags: list[str], tree: Path = REPO,
                 launcher: tuple[str, ...] = ("-m", "serving.cli")) -> subprocess.Popen:
    """`tessera serve` from the checkout at `tree` (this one by default), once it is ready.
    `launcher` runs it another way (e.g. perf.replay.slowed_serve with its flags)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "TESSERA_LOG_LEVEL": "warning"}
    process = subprocess.Popen([sys.executable, *launcher, "serve", "--port", str(port), *flags],
                               cwd=tree, env=env)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tessera serve exited with {process.returncode}")
        try:
            import httpx

            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return process
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("tessera serve did not become ready")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 500) for _ in range(PROMPT_TOKENS)] for _ in range(count)]


async def in_process(model: Path, clients: int, seconds: float, workload: list[list[int]]) -> tuple[list[Stream], float]:
    """The same workload through AsyncEngine in this process: no HTTP, no JSON."""
    from runtime.async_engine import AsyncEngine
    from runtime.compile_cache import enable_compilation_cache
    from runtime.engine import Engine
    from serving.config import ServerConfig

    enable_compilation_cache()
    config = ServerConfig(max_num_seqs=clients, max_num_batched_tokens=256, max_model_len=MAX_MODEL_LEN,
                          token_buckets=TOKEN_BUCKETS)
    engine = Engine.from_model_dir(model, config=config.engine_config())
    engine.warm_up()
    front = AsyncEngine(engine)
    from runtime.request import SamplingParams

    async def one(index: int, number: int, deadline: float) -> Stream:
        result = Stream(start=time.perf_counter())
        params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, temperature=1.0, seed=index * 1000 + number)
        stream = front.generate(workload[(index + number) % len(workload)], params)
        try:
            while True:
                output = await _before(anext(stream), deadline)
                tokens = sum(len(o.token_ids) for o in output.outputs)
                if tokens:
                    result.chunk_times.append(time.perf_counter())
                    result.tokens += tokens
                if output.finished:
                    break
        except TimeoutError:
            result.cut = True
        finally:
            await stream.aclose()
        return result

    try:
        return await run_clients(one, clients, seconds)
    finally:
        front.shutdown()


def over_http(port: int, clients: int, seconds: float, workload: list[list[int]]) -> tuple[list[Stream], float]:
    async def one(index: int, number: int, deadline: float) -> Stream:
        body = {"prompt": workload[(index + number) % len(workload)], "max_tokens": MAX_TOKENS, "temperature": 1.0,
                "seed": index * 1000 + number, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        return await stream_once("127.0.0.1", port, "/v1/completions", body, deadline)

    return asyncio.run(run_clients(one, clients, seconds))


def chat_streams(port: int, clients: int, seconds: float) -> tuple[list[Stream], float]:
    questions = ["Tell me a short story about a cat.", "What is the capital of France?",
                 "Describe the sea on a calm day.", "Why do birds sing in the morning?"]

    async def one(index: int, number: int, deadline: float) -> Stream:
        body = {"messages": [{"role": "user", "content": questions[(index + number) % len(questions)]}],
                "max_tokens": 96, "temperature": 0.8, "seed": index * 1000 + number, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        return await stream_once("127.0.0.1", port, "/v1/chat/completions", body, deadline)

    return asyncio.run(run_clients(one, clients, seconds))


# -- reporting ------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(name: str, streams: list[Stream], wall: float) -> dict:
    ok = [s for s in streams if s.ok]
    ttfts = [s.ttft for s in ok if s.ttft is not None]
    itls = [x for s in ok for x in s.itls]
    tokens = sum(s.tokens for s in ok)
    return dict(path=name, requests=len(streams), completed=sum(not s.cut for s in ok), errors=len(streams) - len(ok),
                tokens=tokens, wall_s=wall,
                tok_s=tokens / wall, ttft_p50=percentile(ttfts, 50), ttft_p99=percentile(ttfts, 99),
                itl_p50=percentile(itls, 50), itl_p99=percentile(itls, 99),
                first_error=next((s.error for s in streams if not s.ok), ""))


def machine() -> str:
    cores = os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.machine()}, {cores} cores, {platform.python_version()}, load average {load:.1f} at the end"


def table(rows: list[dict]) -> str:
    lines = ["| path | requests (completed) | errors | tokens in the window | tok/s | TTFT P50 | TTFT P99 | "
             "ITL P50 | ITL P99 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['requests']} ({r['completed']}) | {r['errors']} | {r['tokens']} | "
                     f"{r['tok_s']:.1f} | "
                     f"{r['ttft_p50'] * 1e3:.0f} ms | {r['ttft_p99'] * 1e3:.0f} ms | {r['itl_p50'] * 1e3:.1f} ms | "
                     f"{r['itl_p99'] * 1e3:.1f} ms |")
    return "\n".join(lines)


def load_mode(args) -> str:
    """In-process, then HTTP, then in-process again: the machine's drift shows in the two baselines."""
    model = build_model()
    workload = prompts(256)
    rows = []
    streams, wall = asyncio.run(in_process(model, args.clients, args.seconds, workload))
    rows.append(summary("in-process AsyncEngine (before)", streams, wall))
    print(table(rows), flush=True)
    port = free_port()
    server = start_server(port, ["--model", str(model), "--allow-unsigned", "--max-num-seqs", str(args.clients),
                                 "--max-num-batched-tokens", "256", "--max-model-len", str(MAX_MODEL_LEN),
                                 "--token-buckets", TOKEN_BUCKETS, "--max-queue", str(args.clients)])
    try:
        streams, wall = over_http(port, args.clients, args.seconds, workload)
    finally:
        stop_server(server)
    rows.append(summary("HTTP (tessera serve, SSE)", streams, wall))
    print(table(rows), flush=True)
    streams, wall = asyncio.run(in_process(model, args.clients, args.seconds, workload))
    rows.append(summary("in-process AsyncEngine (after)", streams, wall))
    baseline = (rows[0]["tok_s"] + rows[2]["tok_s"]) / 2
    ratio = rows[1]["tok_s"] / baseline
    verdict = "meets" if ratio >= 0.9 else "misses"
    return (
        f"## {args.clients} concurrent streaming clients, {args.seconds:.0f} s\n\n"
        f"Machine: {machine()}. Model: random llama {SHAPE['hidden_size']}x{SHAPE['num_hidden_layers']} layers "
        f"(~20M parameters, float32), {PROMPT_TOKENS}-token prompts, {MAX_TOKENS} new tokens each "
        f"(ignore_eos), max_num_seqs={args.clients}, token buckets {TOKEN_BUCKETS}.\n\n"
        f"{table(rows)}\n\n"
        f"HTTP / in-process throughput (mean of the two in-process runs): **{ratio:.2f}** ({verdict} the 0.9 aim). "
        f"Errors over HTTP: {rows[1]['errors']}"
        + (f" (first: {rows[1]['first_error']})" if rows[1]["errors"] else "") + ".\n"
    )


def chat_mode(args) -> str:
    from serving.default_model import DEMO_MODEL, resolve_model

    model = resolve_model(None)
    port = free_port()
    server = start_server(port, ["--max-num-seqs", str(args.chats), "--max-num-batched-tokens", "256",
                                 "--token-buckets", "16,64,256", "--max-queue", str(args.chats)])
    try:
        streams, wall = chat_streams(port, args.chats, args.seconds)
    finally:
        stop_server(server)
    row = summary("HTTP chat", streams, wall)
    ok = [s for s in streams if s.ok and not s.cut and s.decode_tok_s is not None]
    decode = [s.decode_tok_s for s in ok]
    e2e = [s.e2e_tok_s for s in ok]
    slowest = min(decode) if decode else float("nan")
    verdict = "every stream meets" if decode and slowest >= MIN_CHAT_TOK_S and not row["errors"] else "FAILS"
    which = "the trained demo model" if model == DEMO_MODEL else "the random fallback (no models/demo yet)"
    return (
        f"## {args.chats} concurrent chats on the default model, {args.seconds:.0f} s\n\n"
        f"Machine: {machine()}. Model: {model.name} ({which}), 96 new tokens per answer (ignore_eos), "
        f"max_num_seqs={args.chats}.\n\n{table([row])}\n\n"
        f"Per-stream decode rate (tokens after the first / their time): min {slowest:.1f}, "
        f"median {statistics.median(decode) if decode else float('nan'):.1f} tok/s; including time to first token: "
        f"min {min(e2e) if e2e else float('nan'):.1f} tok/s. {verdict} the {MIN_CHAT_TOK_S:.0f} tok/s floor "
        f"({len(ok)} streams).\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64, help="concurrent streaming clients (load mode)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long clients keep starting requests")
    parser.add_argument("--chats", type=int, help="chat mode: this many concurrent chats on the default model")
    parser.add_argument("--out", help="append the markdown result to this file")
    args = parser.parse_args()
    report = chat_mode(args) if args.chats else load_mode(args)
    print(report)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
