"""The C++ CPU attention kernel beside the jnp reference, one layer's call, same inputs.

SmolLM2-135M's attention shape (9 heads, 3 KV heads, head_dim 64), 16-token pages:
decode steps of 1 and 16 sequences, and the last 512-token chunk of a 2,048-token prompt.

    .venv/bin/python perf/bench_cpu_attention.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime  # noqa: E402,F401  (XLA CPU flags, as the server runs)
from kernels.ragged_paged_attention_cpu import ragged_paged_attention_cpu  # noqa: E402
from kernels.ragged_paged_attention_ref import ragged_paged_attention_ref  # noqa: E402

HEADS, KV_HEADS, DIM, PAGE, MAX_LEN = 9, 3, 64, 16, 4096


def batch(q_lens: list[int], ctx_lens: list[int], seed: int = 0):
    rng = np.random.default_rng(seed)
    blocks = MAX_LEN // PAGE
    pages = len(q_lens) * blocks
    k = jnp.asarray(rng.standard_normal((pages, PAGE, KV_HEADS, DIM), np.float32))
    v = jnp.asarray(rng.standard_normal((pages, PAGE, KV_HEADS, DIM), np.float32))
    q = jnp.asarray(rng.standard_normal((sum(q_lens), HEADS, DIM), np.float32))
    tables = jnp.asarray(rng.permutation(pages).reshape(len(q_lens), blocks).astype(np.int32))
    qsl = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32))
    return q, k, v, tables, jnp.asarray(ctx_lens, jnp.int32), qsl


def seconds(fn, args, repeats: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    scale = DIM**-0.5
    kernel = jax.jit(lambda *a: ragged_paged_attention_cpu(*a, sm_scale=scale))
    reference = jax.jit(lambda *a: ragged_paged_attention_ref(*a, sm_scale=scale))
    cases = {
        "decode, 1 sequence, context 256": ([1], [256]),
        "decode, 16 sequences, context 256": ([1] * 16, [256] * 16),
        "decode, 16 sequences, context 2048": ([1] * 16, [2048] * 16),
        "prefill chunk 512 at 1536..2048": ([512], [2048]),
    }
    print(f"one layer, {HEADS} heads / {KV_HEADS} KV heads, head_dim {DIM}, page {PAGE}, float32")
    print("| case | C++ kernel ms | jnp reference ms | speed-up |")
    print("|---|---|---|---|")
    for name, (q_lens, ctx) in cases.items():
        args = batch(q_lens, ctx)
        np.testing.assert_allclose(np.asarray(kernel(*args)), np.asarray(reference(*args)), rtol=1e-4, atol=1e-4)
        mine, ref = seconds(kernel, args), seconds(reference, args, repeats=5)
        print(f"| {name} | {mine * 1e3:.3f} | {ref * 1e3:.3f} | {ref / mine:.1f}x |")


if __name__ == "__main__":
    main()
