"""x @ W on CPUs for the few rows of a decode step: the C++ custom call in `kernels/cpu/`.

XLA CPU runs a matrix-vector product on one thread and emulates bfloat16 products; this
streams the weight over all intra-op threads and widens bfloat16 in registers
(`kernels/cpu/linear.cc`). For steps of at most `MAX_ROWS` tokens; larger ones are
compute-bound matrix products that XLA's own kernels do well.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from kernels.cpu_library import register

TARGET = "tessera_linear"
MAX_ROWS = 64  # rows of x up to which the kernel is used (decode buckets)


def linear_cpu(x: Float[Array, "rows k"], w: Float[Array, "..."], *, transposed: bool = False) -> Float[Array, "rows n"]:
    """x [rows, K] @ w [K, N], or x @ w.T for w [N, K] with `transposed`; the result has x's dtype."""
    register()
    for name, a in (("x", x), ("w", w)):
        if a.ndim != 2 or a.dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"{name} must be a float32 or bfloat16 matrix, got {a.dtype}{list(a.shape)}")
    k, n = (w.shape[1], w.shape[0]) if transposed else w.shape
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} columns but w has {k} input features")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), x.dtype), vmap_method="sequential")
    return call(x, w, layout="nk" if transposed else "kn")
