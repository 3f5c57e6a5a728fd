"""Serving figures for one system on one model shape, written as JSON (perf/gpu_check.sh).

    python perf/gpu_serve_bench.py --system tessera|transformers --shape llama-3.1-8b --out F.json
    python perf/gpu_serve_bench.py --system tessera --shape llama-3.1-8b --quantization fp8 --out F.json

Random weights of the shape, made on the device. Three workloads, the same for both systems:
- time to first token for `--ttft-runs` different `--long-prompt`-token prompts (2,048) sent
  one at a time (the engine idle between them): P50 and P99 (with 10 runs, P99 is the slowest);
- batch-1 decode: a 128-token prompt, `--decode-new` tokens (default `--new`); tok/s over the decode steps;
- `--concurrent` requests (256) of 128 prompt tokens and `--new` (256) new tokens at once:
  generated tokens over wall time, prefill included.
Tessera's process also measures the device's copy bandwidth (the roofline the table divides
by) and, with `--quantization fp8`, the FP8 model's top-1 agreement and logit error against
the bfloat16 model it was quantized from (perf/fp8_agreement.py), before serving it.
`--shape tiny` on CPU runs the same code in seconds (tests/perf/test_gpu_check_smoke.py).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import re
import statistics
import sys
import time
from collections import Counter
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


def copy_bandwidth_gbs(mib: int = 1024) -> float:
    """A device-to-device copy of `mib` MiB of random float32 through XLA, bytes read plus written,
    median of 10 after a warm-up (random data: zeros can run faster than real data)."""
    import jax
    import jax.numpy as jnp

    x = jax.random.uniform(jax.random.key(0), (mib * 2**18,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)
    copy(x).block_until_ready()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * x.nbytes / statistics.median(times) / 1e9


def device_name() -> str:
    import jax

    d = jax.devices()[0]
    return f"{getattr(d, 'device_kind', d.platform)} ({d.platform})"


# -- Tessera -----------------------------------------------------------------------------------


def bench_tessera(args, raw: dict) -> dict:
    import jax

    from models.loader import lay_out
    from perf.fp8_agreement import FP8_LAYOUT, agreement
    from perf.random_model import numbered_tokenizer, random_model
    from runtime.config import EngineConfig
    from runtime.engine import Engine
    from runtime.request import SamplingParams

    copy_gbs = copy_bandwidth_gbs(args.copy_mib)  # first, while the device holds nothing else
    t = time.perf_counter()
    model = random_model(raw, args.dtype)
    made_s = time.perf_counter() - t
    extra = {}
    if args.quantization == "fp8":
        # The FP8 model against the bfloat16 one it is made from, teacher-forced on random tokens
        # (random weights give near-flat logits: a harsher top-1 test than a trained model's).
        t = time.perf_counter()
        quantized = lay_out(model, FP8_LAYOUT)
        tokens = np.asarray(prompts(args.agreement_windows, args.agreement_length, 5, raw["vocab_size"]), np.int32)
        extra["fp8_agreement"] = agreement(model, quantized, tokens)
        extra["fp8_agreement_s"] = time.perf_counter() - t
        model = quantized  # the bfloat16 weights are freed before the KV cache is sized
        gc.collect()
    config = EngineConfig(
        max_num_seqs=args.concurrent, max_num_batched_tokens=args.long_prompt, max_model_len=4096,
        # Only the buckets these workloads reach: batch-1 decode, the batch's decode, whole 2k prefills.
        token_buckets=(1, args.concurrent, args.long_prompt), kv_cache_memory_bytes=int(args.kv_gib * 2**30),
        gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False,
        attention_backend=args.attention, quantization=args.quantization,
    )
    t = time.perf_counter()
    model = Engine.served_layout(model, config)  # the checkpoint layout's arrays freed here
    engine = Engine(model, numbered_tokenizer(raw["vocab_size"]), config)
    del model
    engine_s = time.perf_counter() - t
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(engine.model.state))
    # A decode step reads every weight but the embedding table, of which it gathers a row per token,
    # unless the table is the head too (tied, and read as itself: no separate lm_head weight).
    state = engine.model.state
    embedding = state["embed_tokens"].get_value().nbytes if "lm_head" in state else 0
    warm_s = engine.runner.warm_up(adjust_variants=(False,))
    print(f"tessera {args.shape} {args.quantization or args.dtype}: weights {param_bytes / 2**30:.2f} GiB made in "
          f"{made_s:.1f}s, plan {engine.plan}, {engine.blocks.num_blocks} KV pages (engine {engine_s:.1f}s), "
          f"warm-up {warm_s:.1f}s, copy {copy_gbs:.0f} GB/s", flush=True)

    run = functools.partial(step_marks, engine)
    vocab = raw["vocab_size"]
    greedy = dict(temperature=0.0, ignore_eos=True)
    run(prompts(1, args.long_prompt, 99, vocab), SamplingParams(max_tokens=1, **greedy))  # first-use effects
    ttft = [run(prompts(1, args.long_prompt, 100 + i, vocab), SamplingParams(max_tokens=1, **greedy))[0]
            for i in range(args.ttft_runs)]
    marks = run(prompts(1, PROMPT, 7, vocab), SamplingParams(max_tokens=args.decode_new, **greedy))
    decode_tps = (len(marks) - 1) / (marks[-1] - marks[0])
    if args.quantization is None:  # the same decode with steps in series: what the overlap hides
        engine.config.async_scheduling = False
        marks = run(prompts(1, PROMPT, 9, vocab), SamplingParams(max_tokens=args.decode_new, **greedy))
        extra["decode_tps_series"] = (len(marks) - 1) / (marks[-1] - marks[0])
        engine.config.async_scheduling = True
    preempted = engine.scheduler.num_preemptions
    marks = run(prompts(args.concurrent, PROMPT, 8, vocab), SamplingParams(max_tokens=args.new, **greedy))
    extra["memory_stats"] = jax.devices()[0].memory_stats()  # peak against the pool: the fraction held
    extra["step_custom_calls"] = step_custom_calls(engine, args.concurrent)
    return dict(
        extra, system="tessera", attention=engine.plan.attention, plan=engine.plan.labels(), warm_up_s=warm_s,
        param_bytes=param_bytes, decode_weight_bytes=param_bytes - embedding, ttft_s=ttft, decode_tps=decode_tps,
        copy_gbs=copy_gbs, kv_pages=engine.blocks.num_blocks,
        concurrent_tps=args.concurrent * args.new / marks[-1], concurrent_preemptions=engine.scheduler.num_preemptions - preempted,
    )


def step_custom_calls(engine, bucket: int) -> dict[str, int]:
    """Custom calls of the compiled decode step of `bucket` tokens, by target: which GEMMs XLA chose
    (cuBLAS' FP8 matmul for fp8 weights on Hopper, `__cublas$lt$matmul$f8`) and the attention kernel."""
    hlo = engine.runner.lower_step(bucket).compile().as_text()
    return dict(Counter(re.findall(r'custom_call_target="([^"]+)"', hlo)))


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
    embedding = model.get_input_embeddings().weight
    untied = embedding is not model.get_output_embeddings().weight
    decode_weight_bytes = param_bytes - (embedding.numel() * embedding.element_size() if untied else 0)
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
    full = generate(one, args.decode_new)
    concurrent_s = generate(prompts(args.concurrent, PROMPT, 8, vocab), args.new)
    return dict(
        system="transformers", attention="sdpa", param_bytes=param_bytes, decode_weight_bytes=decode_weight_bytes,
        ttft_s=ttft, torch=torch.__version__,
        transformers=transformers.__version__, decode_tps=(args.decode_new - 1) / (full - first),
        concurrent_tps=args.concurrent * args.new / concurrent_s,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system", choices=("tessera", "transformers"), required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantization", choices=("fp8",), help="tessera: fp8 weights (made from --dtype's)")
    ap.add_argument("--ttft-runs", type=int, default=10)
    ap.add_argument("--long-prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--decode-new", type=int, help="batch-1 decode's new tokens (a rate); default --new")
    ap.add_argument("--concurrent", type=int, default=256)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                    help="tessera: as `tessera serve`; the KV cache takes the rest (the CPU uses --kv-gib)")
    ap.add_argument("--kv-gib", type=float, default=16.0, help="tessera: KV cache where the device reports no memory")
    ap.add_argument("--copy-mib", type=int, default=1024, help="tessera: size of the bandwidth copy")
    ap.add_argument("--agreement-windows", type=int, default=4)
    ap.add_argument("--agreement-length", type=int, default=256)
    ap.add_argument("--attention", help="force an attention backend (as `tessera serve --attention`); default: by device")
    args = ap.parse_args()
    args.decode_new = args.decode_new or args.new
    if args.system == "tessera":
        from runtime.kv_memory import apply_pool_fraction

        apply_pool_fraction(args.gpu_memory_utilization)  # before jax starts its GPU backend
    raw = SHAPES[args.shape]
    result = (bench_tessera if args.system == "tessera" else bench_transformers)(args, raw)
    if args.system == "tessera":
        result["device"] = device_name()
    result.update(shape=args.shape, dtype=args.dtype, quantization=args.quantization, new_tokens=args.new,
                  decode_new_tokens=args.decode_new,
                  concurrent=args.concurrent, prompt_tokens=PROMPT, long_prompt=args.long_prompt,
                  kv_bytes_per_token=_kv_bytes_per_token(raw, args.dtype))
    args.out.write_text(json.dumps(result, indent=1))
    ttft = result["ttft_s"]
    print(f"{args.system} {args.shape} {args.quantization or args.dtype}: TTFT P50 {percentile(ttft, 50) * 1e3:.1f} ms "
          f"P99 {percentile(ttft, 99) * 1e3:.1f} ms, decode {result['decode_tps']:.1f} tok/s, {args.concurrent} "
          f"concurrent {result['concurrent_tps']:.0f} tok/s", flush=True)


def _kv_bytes_per_token(raw: dict, dtype: str) -> int:
    width = 2 if dtype == "bfloat16" else 4
    return raw["num_hidden_layers"] * 2 * raw["num_key_value_heads"] * raw["head_dim"] * width


if __name__ == "__main__":
    main()
