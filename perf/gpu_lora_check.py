"""The LoRA kernels (kernels/lora_bgmv.py) on a GPU: correctness against the XLA product, then timings.

    python perf/gpu_lora_check.py --out lora.json [--smoke]

1. Correctness: BGMV and SGMV compiled for the device (not interpreted), float32 and bfloat16,
   ranks 8/16/64, tokens spread over 4 adapters and the base (slot 0); relative error against
   the XLA product (`models/lora.lora_delta`, float32 on the same inputs): < 1e-5 float32
   (the GPU's float32 products: 1e-5 leaves room for summation order), < 2e-2 bfloat16.
2. Timings (bf16, rank 16, 4 adapters + the base, Llama-3.1-8B's gate_proj: 4096 -> 14336):
   decode batches of 8 and 64 tokens and a 512-token prefill of one adapter, the kernels
   against the XLA masked product the CPU runs (every token against every slot).
`--smoke` runs small shapes in interpret mode on CPU, to check this script itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kernels.lora_bgmv import lora_bgmv  # noqa: E402
from models.lora import lora_delta  # noqa: E402
from perf.gpu_kernel_check import device_time  # noqa: E402

TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
SLOTS = 5  # 4 adapters and slot 0 (the base)


def _case(seed: int, tokens: int, fan_in: int, fan_out: int, rank: int, dtype, slots=None):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((2, SLOTS, fan_in, rank)).astype(np.float32) / np.sqrt(fan_in)
    b = rng.standard_normal((2, SLOTS, rank, fan_out)).astype(np.float32)
    a[:, 0], b[:, 0] = 0, 0
    x = rng.standard_normal((tokens, fan_in)).astype(np.float32)
    slots = rng.integers(0, SLOTS, tokens) if slots is None else slots
    return jnp.asarray(x, dtype), jnp.asarray(a, dtype), jnp.asarray(b, dtype), jnp.asarray(slots, jnp.int32)


def _xla(x, a, b, slots, layer):
    return lora_delta(x, a[layer], b[layer], jax.nn.one_hot(slots, a.shape[1], dtype=a.dtype)).astype(x.dtype)


def check_correctness(interpret: bool, smoke: bool, cases, rows: list[dict], save) -> None:
    widths = (64, 96) if smoke else (4096, 14336)
    for tokens, rank, block in cases:
        for dtype in ("float32", "bfloat16"):
            row = dict(tokens=tokens, rank=rank, block_tokens=block, dtype=dtype)
            try:
                x, a, b, slots = _case(tokens + rank, tokens, *widths, rank, getattr(jnp, dtype))
                got = jax.jit(lambda *v: lora_bgmv(*v, 1, interpret=interpret, block_tokens=block))(x, a, b, slots)
                f32 = lambda v: v.astype(jnp.float32)  # noqa: E731
                want = np.asarray(jax.jit(_xla)(f32(x), f32(a), f32(b), slots, 1))
                err = float(np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max())
                row.update(rel_err=err, ok=bool(err < TOLERANCE[dtype]))
            except Exception as e:  # recorded, so the timings still run
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
                traceback.print_exc()
            rows.append(row)
            save()
            print(f"lora correctness {row}", flush=True)


def time_workloads(interpret: bool, smoke: bool, rows: list[dict], save) -> None:
    fan_in, fan_out = (64, 96) if smoke else (4096, 14336)
    rng = np.random.default_rng(0)
    for name, tokens, slots in [("decode 8 tokens, 4 adapters", 8, rng.integers(0, SLOTS, 8)),
                                ("decode 64 tokens, 4 adapters", 64, rng.integers(0, SLOTS, 64)),
                                ("prefill 512 tokens, one adapter", 512, np.full(512, 3))]:
        row = dict(workload=name)
        try:
            x, a, b, s = _case(1, tokens, fan_in, fan_out, 16, jnp.bfloat16, slots)
            ours = jax.jit(lambda *v: lora_bgmv(*v, 1, interpret=interpret))
            xla = jax.jit(lambda *v: _xla(*v, 1))
            row["kernel_s"] = device_time(ours, x, a, b, s, iters=5 if smoke else 50, repeats=1 if smoke else 5)
            row["xla_s"] = device_time(xla, x, a, b, s, iters=5 if smoke else 50, repeats=1 if smoke else 5)
            # the bytes a gathered product must move: x, its slots' A and B, y
            used = len(set(np.asarray(s).tolist()) - {0})
            row["bytes"] = 2 * (x.size + used * (fan_in * 16 + 16 * fan_out) + tokens * fan_out)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:1000]
            traceback.print_exc()
        rows.append(row)
        save()
        print(f"lora timing {row}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="small shapes, interpret mode, for CPU")
    args = ap.parse_args()
    interpret = args.smoke or jax.default_backend() != "gpu"
    result = dict(device=str(jax.devices()[0].device_kind), interpret=interpret)
    rows, timings = result["correctness"], result["timings"] = [], []

    def save():  # after every row: the phase's time limit is short, a timeout keeps what was done
        result["lora_ok"] = bool(rows) and all(r["ok"] for r in rows)
        args.out.write_text(json.dumps(result, indent=1))

    # (tokens, rank, block_tokens): the two forms at rank 16 first, the timings, then the other ranks
    check_correctness(interpret, args.smoke, [(7, 16, 1), (100, 16, 16)], rows, save)
    time_workloads(interpret, args.smoke, timings, save)
    check_correctness(interpret, args.smoke, [(7, 8, 1), (100, 64, 16), (1, 16, None)], rows, save)
    print(f"lora_ok={result['lora_ok']}", flush=True)


if __name__ == "__main__":
    main()
