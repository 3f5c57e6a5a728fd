"""The attention kernel on a GPU: correctness against dense attention, then timings.

    python perf/gpu_kernel_check.py --out kernel.json [--smoke]

1. Correctness: the kernel compiled for the device (not interpreted) on fresh random
   ragged batches (every GQA ratio to 8, head_dim 64 and 128, float32 and bfloat16, sliding
   window, soft-cap, empty slots, chunks across pages); outputs poisoned with NaN; relative
   error against float64-free numpy dense attention: < 1e-5 float32, < 1e-2 bfloat16.
2. Timings (bf16, Llama-3.1-8B's attention: 32 heads, 8 KV heads, head_dim 128, 16-token
   pages): decode at contexts of 2,048 tokens for batches 1, 8 and 64, against jax's own
   `jax.experimental.pallas.ops.gpu.paged_attention` and the XLA reference; one 2,048-token
   prefill chunk against the reference; the K/V page write. Achieved GB/s counts the bytes
   that must move (K/V read once, queries read, outputs written) beside the measured
   device copy bandwidth.
`--smoke` runs small shapes in interpret mode on CPU, to check this script itself.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kernels.paged_kv_write import write_kv_pages_ref  # noqa: E402
from kernels.ragged_paged_attention import ragged_paged_attention  # noqa: E402
from kernels.ragged_paged_attention_ref import ragged_paged_attention_ref  # noqa: E402
from tests.kernels.attention_cases import make_case, relative_error  # noqa: E402

TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}
# (q_lens, ctx_lens, heads, kv_heads, head_dim, page_size, window, soft_cap)
CASES = [
    ([1, 1, 19, 0, 33, 1], [40, 9, 27, 0, 33, 130], 8, 8, 64, 8, None, None),
    ([1, 1, 19, 0, 33, 1], [40, 9, 27, 0, 33, 130], 16, 8, 128, 16, None, None),
    ([1, 1, 19, 0, 33, 1], [40, 9, 27, 0, 33, 130], 16, 4, 64, 16, None, None),
    ([1, 1, 19, 0, 33, 1], [40, 9, 27, 0, 33, 130], 32, 4, 128, 16, None, None),
    ([1, 200, 1, 1], [700, 500, 5, 1000], 12, 3, 128, 16, None, None),
    ([1, 1, 1, 1], [2048, 77, 1, 900], 32, 8, 128, 16, None, None),
    ([1, 70, 2], [100, 70, 16], 8, 2, 64, 8, 20, None),
    ([1, 70, 2], [100, 70, 16], 8, 2, 128, 16, None, 30.0),
    ([1, 513, 2], [1000, 600, 16], 32, 8, 128, 16, 128, 50.0),
]


def check_correctness(interpret: bool) -> list[dict]:
    rows = []
    for n, (q_lens, ctx, heads, kv_heads, dim, page, window, cap) in enumerate(CASES):
        for dtype in ("float32", "bfloat16"):
            case = make_case(1000 + n, q_lens, ctx, heads, kv_heads, dim, getattr(jnp, dtype), page_size=page,
                             window=window, soft_cap=cap)
            row = dict(case=n, dtype=dtype, heads=heads, kv_heads=kv_heads, head_dim=dim, window=window, soft_cap=cap)
            try:
                out = ragged_paged_attention(*case.arrays, sm_scale=case.sm_scale, sliding_window=window,
                                             soft_cap=cap, interpret=interpret, poison=float("nan"))
                out = np.asarray(out.astype(jnp.float32))
                row["nan"] = bool(np.isnan(out).any())
                row["rel_err"] = relative_error(out, case.want)
                row["ok"] = not row["nan"] and row["rel_err"] < TOLERANCE[dtype]
            except Exception as e:  # recorded, so the timings and the serving runs still happen
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
                traceback.print_exc()
            rows.append(row)
            print(f"correctness case {n} {dtype}: {row.get('rel_err', row.get('error'))} ok={row['ok']}", flush=True)
    return rows


def device_time(fn, *args, iters: int = 50, repeats: int = 5) -> float:
    """Seconds per call: calls enqueued back to back, synchronised at the end; median of repeats."""
    jax.block_until_ready(fn(*args))
    per_call = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t) / iters)
    return statistics.median(per_call)


def copy_bandwidth_gbs(nbytes: int) -> float:
    x = jnp.ones((nbytes // 4,), jnp.float32)
    seconds = device_time(jax.jit(lambda a: a * 1.0001), x, iters=10)
    return 2 * x.nbytes / seconds / 1e9


def decode_inputs(batch: int, ctx: int, heads: int, kv_heads: int, dim: int, page: int, seed: int):
    rng = np.random.default_rng(seed)
    pages_per_seq = ctx // page
    num_pages = batch * pages_per_seq + 8
    tables = rng.permutation(num_pages)[: batch * pages_per_seq].reshape(batch, pages_per_seq).astype(np.int32)
    key = jax.random.key(seed)
    k1, k2, k3 = jax.random.split(key, 3)
    shape = (num_pages, page, kv_heads, dim)
    k_pages = jax.random.normal(k1, shape, jnp.bfloat16)
    v_pages = jax.random.normal(k2, shape, jnp.bfloat16)
    q = jax.random.normal(k3, (batch, heads, dim), jnp.bfloat16)
    lens = jnp.full((batch,), ctx, jnp.int32)
    qsl = jnp.arange(batch + 1, dtype=jnp.int32)
    return q, k_pages, v_pages, jnp.asarray(tables), lens, qsl


def time_decode(batch: int, ctx: int, interpret: bool, heads=32, kv_heads=8, dim=128, page=16) -> dict:
    q, k_pages, v_pages, tables, lens, qsl = decode_inputs(batch, ctx, heads, kv_heads, dim, page, seed=batch)
    scale = dim**-0.5
    moved = 2 * batch * ctx * kv_heads * dim * 2 + 2 * q.nbytes  # K and V once, q in, out
    ours = jax.jit(functools.partial(ragged_paged_attention, sm_scale=scale, interpret=interpret))
    ref = jax.jit(functools.partial(ragged_paged_attention_ref, sm_scale=scale))
    row = dict(workload=f"decode b={batch} ctx={ctx}", bytes=moved)
    row["tessera_s"] = device_time(ours, q, k_pages, v_pages, tables, lens, qsl)
    want = np.asarray(ref(q, k_pages, v_pages, tables, lens, qsl).astype(jnp.float32))
    row["rel_err_vs_reference"] = relative_error(ours(q, k_pages, v_pages, tables, lens, qsl), want)
    row["reference_s"] = device_time(ref, q, k_pages, v_pages, tables, lens, qsl)
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    # jax's layout is [kv_heads, pages, page_size, head_dim] (transposed outside the timing),
    # and it takes no scale: pre-scaled queries give the same attention.
    kt, vt = jnp.transpose(k_pages, (2, 0, 1, 3)), jnp.transpose(v_pages, (2, 0, 1, 3))
    theirs = jax.jit(lambda q, k, v, t, n: paged_attention(q * scale, k, v, t, n, interpret=interpret))
    try:
        row["jax_paged_attention_s"] = device_time(theirs, q, kt, vt, tables, lens)
        row["rel_err_jax_vs_reference"] = relative_error(theirs(q, kt, vt, tables, lens), want)
    except Exception as e:
        row["jax_error"] = f"{type(e).__name__}: {e}"[:1000]
        traceback.print_exc()
    return row


def time_prefill(tokens: int, interpret: bool, heads=32, kv_heads=8, dim=128, page=16) -> dict:
    q, k_pages, v_pages, tables, lens, _ = decode_inputs(1, tokens, heads, kv_heads, dim, page, seed=7)
    q = jax.random.normal(jax.random.key(8), (tokens, heads, dim), jnp.bfloat16)
    qsl = jnp.asarray([0, tokens], jnp.int32)
    scale = dim**-0.5
    ours = jax.jit(functools.partial(ragged_paged_attention, sm_scale=scale, interpret=interpret))
    ref = jax.jit(functools.partial(ragged_paged_attention_ref, sm_scale=scale))
    row = dict(workload=f"prefill chunk {tokens}", bytes=2 * tokens * kv_heads * dim * 2 + 2 * q.nbytes,
               flops=4 * tokens * tokens * heads * dim // 2)  # causal: half the square
    row["tessera_s"] = device_time(ours, q, k_pages, v_pages, tables, lens, qsl, iters=10)
    row["reference_s"] = device_time(ref, q, k_pages, v_pages, tables, lens, qsl, iters=10)
    want = np.asarray(ref(q, k_pages, v_pages, tables, lens, qsl).astype(jnp.float32))
    row["rel_err_vs_reference"] = relative_error(ours(q, k_pages, v_pages, tables, lens, qsl), want)
    return row


def time_kv_write(tokens: int, pages: int = 8192, kv_heads=8, dim=128, page=16) -> dict:
    k = jnp.zeros((pages, page, kv_heads, dim), jnp.bfloat16)
    new = jax.random.normal(jax.random.key(1), (tokens, kv_heads, dim), jnp.bfloat16)
    slots = jnp.asarray(np.random.default_rng(0).permutation(pages * page)[:tokens].astype(np.int32))
    write = jax.jit(write_kv_pages_ref, donate_argnums=(0, 1))
    state = [k, jnp.zeros_like(k)]

    def step():
        state[:] = write(state[0], state[1], new, new, slots)
        return state[0]

    seconds = device_time(lambda: step(), iters=20)
    return dict(workload=f"kv write {tokens} tokens (XLA scatter, donated)", bytes=2 * 2 * new.nbytes, tessera_s=seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="small shapes, interpret mode, for CPU")
    args = ap.parse_args()
    interpret = args.smoke or jax.default_backend() != "gpu"
    result = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, interpret=interpret)
    result["correctness"] = check_correctness(interpret)
    result["kernel_ok"] = all(r["ok"] for r in result["correctness"])
    result["copy_gbs"] = copy_bandwidth_gbs(2**24 if args.smoke else 2**31)
    timings = result["timings"] = []
    save = lambda: args.out.write_text(json.dumps(result, indent=1))  # noqa: E731 (after each stage: a timeout keeps the rest)
    save()
    shapes = [(1, 256), (4, 256)] if args.smoke else [(1, 2048), (8, 2048), (64, 2048)]
    for batch, ctx in shapes:
        try:
            timings.append(time_decode(batch, ctx, interpret, **(dict(heads=8, kv_heads=2) if args.smoke else {})))
        except Exception as e:
            timings.append(dict(workload=f"decode b={batch} ctx={ctx}", error=f"{type(e).__name__}: {e}"[:1000]))
            traceback.print_exc()
        print(timings[-1], flush=True)
        save()
    for fn in (lambda: time_prefill(128 if args.smoke else 2048, interpret,
                                    **(dict(heads=8, kv_heads=2) if args.smoke else {})),
               lambda: time_kv_write(64 if args.smoke else 2048, pages=256 if args.smoke else 8192)):
        try:
            timings.append(fn())
        except Exception as e:
            timings.append(dict(workload="?", error=f"{type(e).__name__}: {e}"[:1000]))
            traceback.print_exc()
        print(timings[-1], flush=True)
        save()
    print(f"kernel_ok={result['kernel_ok']} copy {result['copy_gbs']:.0f} GB/s", flush=True)


if __name__ == "__main__":
    main()
