"""The attention kernel on a GPU: correctness against dense attention, then timings.

    python perf/gpu_kernel_check.py --out kernel.json [--smoke | --dry-run] [--sweep]

1. Correctness: the kernel compiled for the device (not interpreted) on fresh random
   ragged batches (every GQA ratio to 8, head_dim 64 and 128, float32 and bfloat16, sliding
   window, soft-cap, empty slots, chunks across pages); outputs poisoned with NaN; relative
   error against float64-free numpy dense attention: < 1e-5 float32, < 1e-2 bfloat16.
2. Timings (bf16, Llama-3.1-8B's attention: 32 heads, 8 KV heads, head_dim 128, 16-token
   pages): decode at contexts of 2,048 tokens for batches 1, 8 and 64, against jax's own
   `jax.experimental.pallas.ops.gpu.paged_attention` and the XLA reference; one 2,048-token
   prefill chunk against the reference; the K/V page write. Achieved GB/s counts the bytes
   that must move (K/V read once, queries read, outputs written) beside the measured
   device copy bandwidth. The kernel is timed as the engine runs it: a decode step of b
   sequences in a (b tokens, b rows) bucket, its work table built once on the host (its
   numpy time is recorded as `work_table_host_s`; in a model step every layer shares it), so
   the timed call is the two Pallas passes alone. Also recorded: the `decode_only` variant
   (no chunk pass; the engine does not compile it today).
`--sweep` also times the decode steps at other (num_warps, num_stages) settings and with the
kernel building its own table in XLA (a standalone call): more compiles, beyond gpu_check.sh's
limit for this step.
`--smoke` runs small shapes in interpret mode on CPU, to check this script itself.
`--dry-run` (CPU) builds the host tables and lowers every timed function for CUDA at the full
GPU shapes, without running them: the script's GPU path, checked where there is no GPU.
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

from kernels.attention_work import work_table  # noqa: E402
from kernels.paged_kv_write import write_kv_pages_ref  # noqa: E402
from kernels.ragged_paged_attention import plan_for, ragged_paged_attention  # noqa: E402
from kernels.ragged_paged_attention_ref import ragged_paged_attention_ref  # noqa: E402
from tests.kernels.attention_cases import make_case, relative_error  # noqa: E402

TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}
SMOKE_CASES = (0, 6)  # in interpret mode on CPU each case takes seconds
SWEEP = ((4, 2), (8, 2), (4, 3), (8, 3))  # (num_warps, num_stages)
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


def check_correctness(interpret: bool, cases=range(len(CASES))) -> list[dict]:
    rows = []
    for n in cases:
        q_lens, ctx, heads, kv_heads, dim, page, window, cap = CASES[n]
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


def decode_shapes(batch: int, ctx: int, heads: int, kv_heads: int, dim: int, page: int):
    """(q, k_pages, v_pages, block_tables, lens, query_start_loc) as shapes; tables [batch, ctx / page]."""
    num_pages = batch * (ctx // page) + 8
    pages = jax.ShapeDtypeStruct((num_pages, page, kv_heads, dim), jnp.bfloat16)
    return (jax.ShapeDtypeStruct((batch, heads, dim), jnp.bfloat16), pages, pages,
            jax.ShapeDtypeStruct((batch, ctx // page), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32),
            jax.ShapeDtypeStruct((batch + 1,), jnp.int32))


def decode_inputs(batch: int, ctx: int, heads: int, kv_heads: int, dim: int, page: int, seed: int):
    q_shape, pages_shape, _, tables_shape, _, _ = decode_shapes(batch, ctx, heads, kv_heads, dim, page)
    rng = np.random.default_rng(seed)
    tables = rng.permutation(pages_shape.shape[0])[: batch * tables_shape.shape[1]].reshape(tables_shape.shape)
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    k_pages = jax.random.normal(k1, pages_shape.shape, jnp.bfloat16)
    v_pages = jax.random.normal(k2, pages_shape.shape, jnp.bfloat16)
    q = jax.random.normal(k3, q_shape.shape, jnp.bfloat16)
    lens = jnp.full((batch,), ctx, jnp.int32)
    qsl = jnp.arange(batch + 1, dtype=jnp.int32)
    return q, k_pages, v_pages, jnp.asarray(tables.astype(np.int32)), lens, qsl


def host_table(batch: int, ctx: int, heads: int, kv_heads: int, dim: int, page: int, decode_only: bool = False):
    """The table the runner would send for a decode step of `batch` sequences at context `ctx`,
    and the seconds numpy takes to build it (median of 200)."""
    plan = plan_for(batch, batch, heads, kv_heads, dim, page, jnp.bfloat16, decode_only)
    qsl, lens = np.arange(batch + 1, dtype=np.int32), np.full(batch, ctx, np.int32)
    times = []
    for _ in range(200):
        t = time.perf_counter()
        table = work_table(plan, qsl, lens)
        times.append(time.perf_counter() - t)
    return table, statistics.median(times)


def decode_functions(scale: float, interpret: bool, **kernel_args) -> dict:
    """name -> jitted function of (q, k_pages, v_pages, tables, lens, qsl[, table]) for one decode step."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    ours = functools.partial(ragged_paged_attention, sm_scale=scale, interpret=interpret, **kernel_args)

    # jax's layout is [kv_heads, pages, page_size, head_dim] (transposed outside the timing),
    # and it takes no scale: pre-scaled queries give the same attention.
    def theirs(q, k, v, t, n, _):
        return paged_attention(q * scale, k, v, t, n, interpret=interpret)

    return {
        "tessera": jax.jit(ours),  # with the host table
        "tessera_decode_only": jax.jit(functools.partial(ours, decode_only=True)),
        "tessera_xla_table": jax.jit(lambda *a: ours(*a[:6])),  # builds its table in XLA, per call
        "jax_paged_attention": jax.jit(theirs),
        "reference": jax.jit(lambda *a: ragged_paged_attention_ref(*a[:6], sm_scale=scale)),
    }


def time_decode(batch: int, ctx: int, interpret: bool, heads=32, kv_heads=8, dim=128, page=16, iters=50, repeats=5,
                sweep=()) -> dict:
    q, k_pages, v_pages, tables, lens, qsl = decode_inputs(batch, ctx, heads, kv_heads, dim, page, seed=batch)
    scale = dim**-0.5
    moved = 2 * batch * ctx * kv_heads * dim * 2 + 2 * q.nbytes  # K and V once, q in, out
    table, host_s = host_table(batch, ctx, heads, kv_heads, dim, page)
    only, _ = host_table(batch, ctx, heads, kv_heads, dim, page, decode_only=True)
    fns = decode_functions(scale, interpret)
    row = dict(workload=f"decode b={batch} ctx={ctx}", bytes=moved, work_table_host_s=host_s)
    ours_args = (q, k_pages, v_pages, tables, lens, qsl, jnp.asarray(table))
    want = np.asarray(fns["reference"](*ours_args).astype(jnp.float32))
    row["tessera_s"] = device_time(fns["tessera"], *ours_args, iters=iters, repeats=repeats)
    row["rel_err_vs_reference"] = relative_error(fns["tessera"](*ours_args), want)
    only_args = ours_args[:6] + (jnp.asarray(only),)
    row["tessera_decode_only_s"] = device_time(fns["tessera_decode_only"], *only_args, iters=iters, repeats=repeats)
    row["rel_err_decode_only"] = relative_error(fns["tessera_decode_only"](*only_args), want)
    if sweep:  # compiles the kernels again; informative only
        row["tessera_xla_table_s"] = device_time(fns["tessera_xla_table"], *ours_args, iters=iters, repeats=repeats)
    row["reference_s"] = device_time(fns["reference"], *ours_args, iters=iters, repeats=repeats)
    kt, vt = jnp.transpose(k_pages, (2, 0, 1, 3)), jnp.transpose(v_pages, (2, 0, 1, 3))
    theirs_args = (q, kt, vt, tables, lens, None)
    try:
        row["jax_paged_attention_s"] = device_time(fns["jax_paged_attention"], *theirs_args, iters=iters,
                                                   repeats=repeats)
        row["rel_err_jax_vs_reference"] = relative_error(fns["jax_paged_attention"](*theirs_args), want)
    except Exception as e:
        row["jax_error"] = f"{type(e).__name__}: {e}"[:1000]
        traceback.print_exc()
    for warps, stages in sweep:
        fn = decode_functions(scale, interpret, num_warps=warps, num_stages=stages)["tessera"]
        row[f"tessera_w{warps}_s{stages}_s"] = device_time(fn, *ours_args, iters=iters, repeats=repeats)
    return row


def ratio_line(row: dict) -> str:
    """One printed line per decode workload: our times and their ratio to jax's kernel (> 1: faster)."""
    jax_s = row.get("jax_paged_attention_s")
    line = (f"{row['workload']}: tessera {row['tessera_s'] * 1e6:.1f} us, decode-only "
            f"{row['tessera_decode_only_s'] * 1e6:.1f} us; host table {row['work_table_host_s'] * 1e6:.0f} us per step")
    if jax_s:
        line += (f"; jax {jax_s * 1e6:.1f} us -> {jax_s / row['tessera_s']:.2f}x "
                 f"(decode-only {jax_s / row['tessera_decode_only_s']:.2f}x)")
    return line


def dry_run(out: Path) -> None:
    """Lower every timed function for CUDA at the GPU shapes; build the host tables."""
    scale = 128**-0.5
    result = dict(jax=jax.__version__, lowered=[])
    for batch in (1, 8, 64):
        shapes = decode_shapes(batch, 2048, 32, 8, 128, 16)
        table, host_s = host_table(batch, 2048, 32, 8, 128, 16)
        only, _ = host_table(batch, 2048, 32, 8, 128, 16, decode_only=True)
        jax_shapes = (shapes[0], *(jax.ShapeDtypeStruct((8, s.shape[0], 16, 128), jnp.bfloat16) for s in shapes[1:3]),
                      shapes[3], shapes[4], None)
        for name, fn in decode_functions(scale, interpret=False).items():
            args = jax_shapes if name == "jax_paged_attention" else (
                *shapes, jax.ShapeDtypeStruct((only if name == "tessera_decode_only" else table).shape, jnp.int32))
            text = jax.export.export(fn, platforms=["cuda"], disabled_checks=[
                jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args).mlir_module()
            result["lowered"].append(dict(workload=f"decode b={batch} ctx=2048", fn=name,
                                          triton_calls=text.count("__gpu$xla.gpu.triton"), host_table_s=host_s))
            print(result["lowered"][-1], flush=True)
    out.write_text(json.dumps(result, indent=1))


def time_prefill(tokens: int, interpret: bool, heads=32, kv_heads=8, dim=128, page=16, iters=10, repeats=5) -> dict:
    q, k_pages, v_pages, tables, lens, _ = decode_inputs(1, tokens, heads, kv_heads, dim, page, seed=7)
    q = jax.random.normal(jax.random.key(8), (tokens, heads, dim), jnp.bfloat16)
    qsl = jnp.asarray([0, tokens], jnp.int32)
    table = work_table(plan_for(tokens, 1, heads, kv_heads, dim, page, jnp.bfloat16), np.asarray(qsl),
                       np.asarray(lens))
    scale = dim**-0.5
    ours = jax.jit(functools.partial(ragged_paged_attention, sm_scale=scale, interpret=interpret))
    ref = jax.jit(functools.partial(ragged_paged_attention_ref, sm_scale=scale))
    row = dict(workload=f"prefill chunk {tokens}", bytes=2 * tokens * kv_heads * dim * 2 + 2 * q.nbytes,
               flops=4 * tokens * tokens * heads * dim // 2)  # causal: half the square
    args = (q, k_pages, v_pages, tables, lens, qsl)
    row["tessera_s"] = device_time(ours, *args, jnp.asarray(table), iters=iters, repeats=repeats)
    row["reference_s"] = device_time(ref, *args, iters=iters, repeats=repeats)
    want = np.asarray(ref(*args).astype(jnp.float32))
    row["rel_err_vs_reference"] = relative_error(ours(*args, jnp.asarray(table)), want)
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
    ap.add_argument("--dry-run", action="store_true", help="lower for CUDA at the GPU shapes without running")
    ap.add_argument("--sweep", action="store_true", help="decode timings at other warps / stages too")
    args = ap.parse_args()
    if args.dry_run:
        return dry_run(args.out)
    interpret = args.smoke or jax.default_backend() != "gpu"
    result = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, interpret=interpret)
    result["correctness"] = check_correctness(interpret, SMOKE_CASES if args.smoke else range(len(CASES)))
    result["kernel_ok"] = all(r["ok"] for r in result["correctness"])
    result["copy_gbs"] = copy_bandwidth_gbs(2**24 if args.smoke else 2**31)
    timings = result["timings"] = []
    save = lambda: args.out.write_text(json.dumps(result, indent=1))  # noqa: E731 (after each stage: a timeout keeps the rest)
    save()
    shapes = [(1, 256), (4, 256)] if args.smoke else [(1, 2048), (8, 2048), (64, 2048)]
    small = dict(heads=8, kv_heads=2, iters=1, repeats=1) if args.smoke else {}
    for batch, ctx in shapes:
        try:
            timings.append(time_decode(batch, ctx, interpret, sweep=SWEEP if args.sweep else (), **small))
            print(ratio_line(timings[-1]), flush=True)
        except Exception as e:
            timings.append(dict(workload=f"decode b={batch} ctx={ctx}", error=f"{type(e).__name__}: {e}"[:1000]))
            traceback.print_exc()
        print(timings[-1], flush=True)
        save()
    for fn in (lambda: time_prefill(128 if args.smoke else 2048, interpret, **small),
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
