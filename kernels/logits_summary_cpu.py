"""What sampling needs from the logits, on CPUs: the C++ custom call of
`kernels/cpu/logits_summary.cc`.

`logits_summary_cpu(logits, k)` gives each row's k largest logits with their ids (largest
first, lower id first among equals, as `lax.top_k` orders them) and its log-sum-exp, in one
call that never writes the full log-softmax (XLA CPU spent ~10 ms of a 16-row step on that,
its top-k and a separate argmax).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels.cpu_library import register

TARGET = "tessera_logits_summary"
MAX_K = 64


def logits_summary_cpu(
    logits: Float[Array, "rows vocab"], k: int
) -> tuple[Float[Array, "rows k"], Int[Array, "rows k"], Float[Array, " rows"]]:
    """(top values, top ids, log-sum-exp) of float32 logits [rows, vocab]."""
    register()
    if logits.ndim != 2 or logits.dtype != jnp.float32:
        raise ValueError(f"logits must be a float32 matrix, got {logits.dtype}{list(logits.shape)}")
    if not 1 <= k <= min(MAX_K, logits.shape[1]):
        raise ValueError(f"k must be in [1, {min(MAX_K, logits.shape[1])}], got {k}")
    rows = logits.shape[0]
    call = jax.ffi.ffi_call(
        TARGET,
        (jax.ShapeDtypeStruct((rows, k), jnp.float32), jax.ShapeDtypeStruct((rows, k), jnp.int32),
         jax.ShapeDtypeStruct((rows,), jnp.float32)),
        vmap_method="sequential",
    )
    return call(logits)
