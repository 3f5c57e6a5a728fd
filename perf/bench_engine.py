"""Tessera's engine beside transformers and llama.cpp, in one run, on one machine.

A random checkpoint with SmolLM2-135M's shapes, float32 and 16-bit weights. Prints one
table: batch-1 decode tok/s with achieved GB/s against the measured read bandwidth, the
engine's host time per decode step, aggregate tok/s of 16 concurrent requests (128 prompt +
128 new tokens), time to first token of a 2,048-token prompt, and Tessera's ratio to each
peer. Tessera runs twice on one compiled engine: overlapped scheduling on (the default) and
off ("tessera, in series").

    .venv/bin/python perf/bench_engine.py [--skip-llama-cpp] [--out perf/results/engine_cpu.md]

Peers run in turn on an otherwise idle machine (transformers' threads collapse when
another process uses the cores). llama.cpp needs `pip install -e '.[perf]'`.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf.engine_timing import step_marks  # noqa: E402

SHAPES = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
    rope_theta=100000.0,
)
PROMPT, NEW, CONCURRENT, LONG_PROMPT = 128, 128, 16, 2048


@dataclass
class Row:
    engine: str
    weights: str
    decode_tps: float = float("nan")
    concurrent_tps: float = float("nan")
    ttft_s: float = float("nan")
    host_ms: float = float("nan")  # engine host time per batch-1 decode step (not waiting on the device)


# -- the machine ---------------------------------------------------------------------------


def read_bandwidth_gbs(gib: float = 1.0) -> float:
    """Best of 5 reads of a 1 GiB float32 array by an XLA reduction, which uses every core.
    (numpy's sum holds the GIL and is compute-bound here: it sees ~9 GB/s on one core.)"""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        total(x).block_until_ready()
        best = max(best, x.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def cpu_model() -> str:
    """The CPU's model name and the instruction sets the kernels choose between."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "")
    flags = set(next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), []))
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name or platform.processor() or platform.machine()} ({', '.join(isa) or 'no AVX2'})"


def build_checkpoint(folder: Path) -> None:
    import torch
    import transformers

    from tests.helpers.tiny_tokenizer import train_tiny_tokenizer

    torch.manual_seed(0)
    shapes = dict(SHAPES)
    theta = shapes.pop("rope_theta")
    config = transformers.LlamaConfig(**shapes, rope_parameters={"rope_type": "default", "rope_theta": theta})
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    train_tiny_tokenizer(folder)


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 500, size=length).tolist() for _ in range(count)]


# -- transformers ----------------------------------------------------------------------------


def bench_transformers(folder: Path, dtype: str) -> Row:
    import torch
    import transformers

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, attn_implementation="sdpa").eval()

    def generate(batch: list[list[int]], new: int) -> float:
        ids = torch.tensor(batch)
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                           min_new_tokens=new, pad_token_id=0)
        return time.perf_counter() - t

    one = prompts(1, PROMPT, 1)
    generate(one, 4)  # warm-up
    first = statistics.median(generate(one, 1) for _ in range(3))
    full = statistics.median(generate(one, NEW) for _ in range(2))
    row = Row("transformers", dtype, decode_tps=(NEW - 1) / (full - first))
    row.concurrent_tps = CONCURRENT * NEW / generate(prompts(CONCURRENT, PROMPT, 2), NEW)
    long = prompts(1, LONG_PROMPT, 3)
    generate(long, 1)
    row.ttft_s = statistics.median(generate(long, 1) for _ in range(3))
    del model
    gc.collect()
    return row


# -- Tessera ---------------------------------------------------------------------------------


def bench_tessera(folder: Path, dtype: str) -> list[Row]:
    """Rows with overlapped scheduling on, then off, from one compiled engine."""
    from runtime.config import EngineConfig
    from runtime.engine import Engine
    from runtime.request import SamplingParams

    engine = Engine.from_model_dir(
        folder,
        dtype,
        # Only the buckets this workload reaches (batch-1 and 16-way decodes, 512-token
        # prefill steps): every extra bucket is one more compile of the 30-layer model.
        EngineConfig(max_num_seqs=CONCURRENT, max_num_batched_tokens=512, max_model_len=4096,
                     token_buckets=(1, 4, 16, 64, 512)),
    )
    print(f"  tessera {dtype}: warm-up compiled in {engine.warm_up():.1f}s", file=sys.stderr)
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    run = functools.partial(step_marks, engine)
    rows = []
    for overlap in (True, False):
        engine.config.async_scheduling = overlap
        decode, host = [], []
        for seed in range(3):
            c = engine.counters
            steps, busy, waited = c.steps, c.engine_seconds, c.device_wait_seconds
            marks = run(prompts(1, PROMPT, 10 + seed), params)
            decode.append((len(marks) - 1) / (marks[-1] - marks[0]))
            host.append(1e3 * ((c.engine_seconds - busy) - (c.device_wait_seconds - waited)) / (c.steps - steps))
        row = Row("tessera" if overlap else "tessera, in series", dtype, decode_tps=statistics.median(decode),
                  host_ms=statistics.median(host))
        marks = run(prompts(CONCURRENT, PROMPT, 2), params)
        row.concurrent_tps = CONCURRENT * NEW / marks[-1]
        one_token = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        ttfts = [run(prompts(1, LONG_PROMPT, 20 + i), one_token)[0] for i in range(3)]
        row.ttft_s = statistics.median(ttfts)
        rows.append(row)
    return rows


# -- llama.cpp -------------------------------------------------------------------------------


def bench_llama_cpp(folder: Path, gguf_type: str) -> Row:
    from perf.gguf_export import export_gguf

    import llama_cpp

    path = export_gguf(folder, gguf_type)
    llm = llama_cpp.Llama(str(path), n_ctx=4096, n_threads=2, n_batch=512, verbose=False, use_extra_bufts=False)

    def generate(ids: list[int], new: int) -> float:
        llm.reset()
        t = time.perf_counter()
        produced = 0
        for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            produced += 1
            if produced == new:
                break
        return time.perf_counter() - t

    one = prompts(1, PROMPT, 1)[0]
    generate(one, 4)
    first = statistics.median(generate(one, 1) for _ in range(3))
    full = statistics.median(generate(one, NEW) for _ in range(2))
    row = Row("llama.cpp", gguf_type, decode_tps=(NEW - 1) / (full - first))
    long = prompts(1, LONG_PROMPT, 3)[0]
    row.ttft_s = statistics.median(generate(long, 1) for _ in range(2))
    return row


# -- report ----------------------------------------------------------------------------------


def table(rows: list[Row], bandwidth: float, model_bytes: dict[str, float]) -> str:
    lines = [
        f"machine: {cpu_model()}, {os.cpu_count()} threads, measured read bandwidth "
        f"{bandwidth:.1f} GB/s (an XLA reduction over 1 GiB, all cores)",
        "",
        "| engine | weights | batch-1 decode tok/s | GB/s (% of bandwidth) | host ms/step | 16 concurrent tok/s "
        "| TTFT 2048 s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gbs = model_bytes[r.weights] * r.decode_tps / 1e9
        lines.append(
            f"| {r.engine} | {r.weights} | {r.decode_tps:.1f} | {gbs:.1f} ({100 * gbs / bandwidth:.0f}%) | "
            f"{'' if r.host_ms != r.host_ms else f'{r.host_ms:.2f}'} | {r.concurrent_tps:.1f} | {r.ttft_s:.3f} |"
        )
    lines += ["", "Ratios (Tessera / peer; decode and concurrent higher is better, TTFT lower is better):", ""]
    tessera = {r.weights: r for r in rows if r.engine == "tessera"}
    for r in rows:
        mine = tessera.get(r.weights)
        if r.engine == "tessera, in series" and mine is not None:
            lines.append(f"- tessera {r.weights}, overlapped vs in series: decode {mine.decode_tps / r.decode_tps:.2f}x, "
                         f"16 concurrent {mine.concurrent_tps / r.concurrent_tps:.2f}x")
    pairs = {"float32": ["float32", "f32"], "bfloat16": ["bfloat16", "f16"]}
    for weights, peer_weights in pairs.items():
        mine = tessera.get(weights)
        for peer in rows:
            if mine is None or peer.engine.startswith("tessera") or peer.weights not in peer_weights:
                continue
            lines.append(
                f"- tessera {weights} vs {peer.engine} {peer.weights}: decode {mine.decode_tps / peer.decode_tps:.2f}x, "
                f"16 concurrent {mine.concurrent_tps / peer.concurrent_tps:.2f}x, "
                f"TTFT {mine.ttft_s / peer.ttft_s:.2f}x the peer's time"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=".cache/bench-smollm2-135m")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--only", choices=["tessera", "transformers", "llama.cpp"], action="append")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out")
    args = ap.parse_args()
    folder = Path(args.dir).absolute()
    if not (folder / "config.json").exists():
        build_checkpoint(folder)
    only = set(args.only or ["tessera", "transformers", "llama.cpp"])
    if args.skip_llama_cpp:
        only.discard("llama.cpp")
    bandwidth = read_bandwidth_gbs()
    params = 134_515_008
    model_bytes = {"float32": 4 * params, "f32": 4 * params, "bfloat16": 2 * params, "f16": 2 * params, "q8_0": 1.0625 * params}
    rows = []
    for dtype in args.dtypes.split(","):
        if "tessera" in only:
            rows += bench_tessera(folder, dtype)
            print(rows[-2:], file=sys.stderr, flush=True)
        if "transformers" in only:
            rows.append(bench_transformers(folder, dtype))
            print(rows[-1], file=sys.stderr, flush=True)
        if "llama.cpp" in only:
            rows.append(bench_llama_cpp(folder, {"float32": "f32", "bfloat16": "f16"}[dtype]))
            print(rows[-1], file=sys.stderr, flush=True)
    report = table(rows, bandwidth, model_bytes)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
