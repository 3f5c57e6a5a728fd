"""Ragged paged attention on CPUs: the C++ custom call in `kernels/cpu/`, built on first use.

Same arguments and results as `ragged_paged_attention_ref` (the jnp reference). The
reference is a loop of small XLA ops per layer whose runtime overhead dominates decode
steps on a CPU; this is one call per layer, threaded over (sequence, KV head, query run).
The library is built and registered by `kernels/cpu_library.py`; `available()` says whether
it could be, and the runtime falls back to the reference when it could not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from kernels.cpu_library import available, register

__all__ = ["available", "ragged_paged_attention_cpu"]

TARGET = "tessera_ragged_paged_attention"


def ragged_paged_attention_cpu(
    q: Float[Array, "tokens heads head_dim"],
    k_pages: Float[Array, "pages page_size kv_heads head_dim"],
    v_pages: Float[Array, "pages page_size kv_heads head_dim"],
    block_tables: Int[Array, "seqs max_blocks"],
    context_lens: Int[Array, " seqs"],
    query_start_loc: Int[Array, " seqs_plus_one"],
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> Float[Array, "tokens heads head_dim"]:
    register()
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages {k_pages.dtype} and v_pages {v_pages.dtype} must share a dtype")
    for name, a in (("q", q), ("k_pages", k_pages)):
        if a.dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"{name} must be float32 or bfloat16, got {a.dtype}")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential")
    as_i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    return call(
        q, k_pages, v_pages, as_i32(block_tables), as_i32(context_lens), as_i32(query_start_loc),
        sm_scale=np.float32(sm_scale), sliding_window=np.int32(sliding_window or 0),
        soft_cap=np.float32(soft_cap or 0.0),
    )
