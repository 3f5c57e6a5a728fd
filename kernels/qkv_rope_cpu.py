"""A fused q/k/v projection with rotary embeddings applied, on CPUs: the product kernels'
"qkv_rope" handlers (`kernels/cpu/linear.cc`, `kernels/cpu/packed_linear.cc`, epilogue in
`kernels/cpu/qkv_rope.h`).

One call leaves q and k rotated and v split out, where XLA ran a fusion per part, each a
dispatch to its intra-op threads (~100 us apiece on the 2-core machine at 16 rows, ~1 ms a
layer for a 512-token bfloat16 chunk).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from kernels.cpu_library import register


def qkv_rope_cpu(
    x: Float[Array, "tokens k"], w: Float[Array, "..."], cos: Float[Array, "tokens half"], sin: Float[Array, "tokens half"],
    heads: int, kv_heads: int, *, packed: bool,
) -> tuple[Float[Array, "tokens heads d"], Float[Array, "tokens kv d"], Float[Array, "tokens kv d"]]:
    """x @ w split into q [T, heads, D], k and v [T, kv_heads, D], q and k rotated by cos/sin
    [T, D / 2] (rotate-half layout). `packed`: w is a packed bfloat16 weight (kernels/packed_linear.py),
    else a float32/bfloat16 [K, N] weight. Outputs take x's dtype."""
    register()
    tokens, half = cos.shape
    d = 2 * half
    n = w.shape[1] // 2 if packed else w.shape[1]
    if x.ndim != 2 or x.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"x must be a float32 or bfloat16 matrix, got {x.dtype}{list(x.shape)}")
    if (heads + 2 * kv_heads) * d != n or sin.shape != cos.shape or tokens != x.shape[0]:
        raise ValueError(f"a projection of {n} columns does not split into {heads} + 2 x {kv_heads} heads of {d}")
    shapes = tuple(jax.ShapeDtypeStruct((tokens, h, d), x.dtype) for h in (heads, kv_heads, kv_heads))
    target = "tessera_packed_qkv_rope" if packed else "tessera_linear_qkv_rope"
    call = jax.ffi.ffi_call(target, shapes, vmap_method="sequential")
    return call(x, w, cos.astype(jnp.float32), sin.astype(jnp.float32))
