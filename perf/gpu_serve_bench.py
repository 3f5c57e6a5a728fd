"""Serving figures for one system on one model shape, written as JSON (perf/gpu_check.sh).

    python perf/gpu_serve_bench.py --system tessera|transformers --shape llama-3.1-8b --out F.json

Random bf16 weights of the shape, made on the device. Three workloads, the same for both
systems:
- time to first token for `--ttft-runs` different 2,048-token prompts sent one at a time
  (the engine idle between them): P50 and P99 (with 10 runs, P99 is the slowest);
- batch-1 decode: a 128-token prompt, `--new` tokens; tok/s over the decode steps, and its
  share of the HBM roofline (weight bytes + KV bytes read per step, over the measured
  copy bandwidth);
- `--concurrent` requests of 128 prompt tokens and `--new` new tokens at once: generated
  tokens over wall time, prefill included.
`--shape tiny` on CPU runs the same code in seconds (a smoke test of this script).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf.engine_timing import step_marks  # noqa: E402
from perf.random_model import SHAPES  # noqa: E402

PROMPT = 128


def prompts(count: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [rng.randint(0, vocab, size=length).tolist() for _ in range(count)]


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q, method="higher"))


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB through XLA, bytes read plus written, median of 10."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((2**28,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)
    copy(x).block_until_ready()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * x.nbytes / statistics.median(times) / 1e9


# -- Tessera -----------------------------------------------------------------------------------


def bench_tessera(args, raw: dict) -> dict:
    import jax

    from perf.random_model import numbered_tokenizer, random_model
    from runtime.config import EngineConfig
    from runtime.engine import Engine
    from runtime.request import SamplingParams

    t = time.perf_counter()
    model = random_model(raw, args.dtype)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(model.state))
    made_s = time.perf_counter() - t
    config = EngineConfig(
        max_num_seqs=args.concurrent, max_num_batched_tokens=args.long_prompt, max_model_len=4096,
        # Only the buckets these workloads reach: batch-1 decode, the batch's decode, whole 2k prefills.
        token_buckets=(1, args.concurrent, args.long_prompt), kv_cache_memory_bytes=int(args.kv_gib * 2**30),
        enable_prefix_caching=False, attention_backend=args.attention,
    )
    engine = Engine(model, numbered_tokenizer(raw["vocab_size"]), config)
    warm_s = engine.runner.warm_up(adjust_variants=(False,))
    print(f"tessera {args.shape}: weights {param_bytes / 2**30:.2f} GiB made in {made_s:.1f}s, "
          f"plan {engine.plan}, warm-up {warm_s:.1f}s", flush=True)

    run = functools.partial(step_marks, engine)

    vocab = raw["vocab_size"]
    greedy = dict(temperature=0.0, ignore_eos=True)
    run(prompts(1, args.long_prompt, 99, vocab), SamplingParams(max_tokens=1, **greedy))  # first-use effects
    ttft = [run(prompts(1, args.long_prompt, 100 + i, vocab), SamplingParams(max_tokens=1, **greedy))[0]
            for i in range(args.ttft_runs)]
    marks = run(prompts(1, PROMPT, 7, vocab), SamplingParams(max_tokens=args.new, **greedy))
    decode_tps = (len(marks) - 1) / (marks[-1] - marks[0])
    engine.config.async_scheduling = False  # the same decode with steps in series: what the overlap hides
    marks = run(prompts(1, PROMPT, 9, vocab), SamplingParams(max_tokens=args.new, **greedy))
    decode_tps_series = (len(marks) - 1) / (marks[-1] - marks[0])
    engine.config.async_scheduling = True
    marks = run(prompts(args.concurrent, PROMPT, 8, vocab), SamplingParams(max_tokens=args.new, **greedy))
    return dict(
        system="tessera", attention=engine.plan.attention, plan=engine.plan.labels(), warm_up_s=warm_s,
        param_bytes=param_bytes, ttft_s=ttft, decode_tps=decode_tps, decode_tps_series=decode_tps_series,
        concurrent_tps=args.concurrent * args.new / marks[-1],
    )


# -- transformers ------------------------------------------------------------------------------


def bench_transformers(args, raw: dict) -> dict:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    config = transformers.AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "architectures"})
    t = time.perf_counter()
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"transformers {args.shape}: {param_bytes / 2**30:.2f} GiB made in {time.perf_counter() - t:.1f}s "
          f"on {device}", flush=True)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def generate(batch, new: int) -> float:
        ids = torch.tensor(batch, device=device)
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                           min_new_tokens=new, pad_token_id=0)
        sync()
        return time.perf_counter() - t

    vocab = raw["vocab_size"]
    generate(prompts(1, args.long_prompt, 99, vocab), 2)  # warm-up
    ttft = [generate(prompts(1, args.long_prompt, 100 + i, vocab), 1) for i in range(args.ttft_runs)]
    one = prompts(1, PROMPT, 7, vocab)
    first = statistics.median(generate(one, 1) for _ in range(3))
    full = generate(one, args.new)
    concurrent_s = generate(prompts(args.concurrent, PROMPT, 8, vocab), args.new)
    return dict(
        system="transformers", attention="sdpa", param_bytes=param_bytes, ttft_s=ttft,
        decode_tps=(args.new - 1) / (full - first), concurrent_tps=args.concurrent * args.new / concurrent_s,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system", choices=("tessera", "transformers"), required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--ttft-runs", type=int, default=10)
    ap.add_argument("--long-prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--concurrent", type=int, default=64)
    ap.add_argument("--kv-gib", type=float, default=4.0)
    ap.add_argument("--attention", help="force an attention backend (as `tessera serve --attention`); default: by device")
    args = ap.parse_args()
    raw = SHAPES[args.shape]
    result = (bench_tessera if args.system == "tessera" else bench_transformers)(args, raw)
    if args.system == "tessera":  # the copy bandwidth from jax; transformers' process leaves it out
        result["copy_gbs"] = copy_bandwidth_gbs()
    result.update(shape=args.shape, dtype=args.dtype, new_tokens=args.new, concurrent=args.concurrent,
                  long_prompt=args.long_prompt, kv_bytes_per_token=_kv_bytes_per_token(raw, args.dtype))
    args.out.write_text(json.dumps(result, indent=1))
    ttft = result["ttft_s"]
    print(f"{args.system} {args.shape}: TTFT P50 {percentile(ttft, 50) * 1e3:.1f} ms P99 {percentile(ttft, 99) * 1e3:.1f} ms, "
          f"decode {result['decode_tps']:.1f} tok/s, {args.concurrent} concurrent {result['concurrent_tps']:.0f} tok/s",
          flush=True)


def _kv_bytes_per_token(raw: dict, dtype: str) -> int:
    width = 2 if dtype == "bfloat16" else 4
    return raw["num_hidden_layers"] * 2 * raw["num_key_value_heads"] * raw["head_dim"] * width


if __name__ == "__main__":
    main()
