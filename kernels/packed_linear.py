"""x @ W on a bfloat16 weight packed once at load: the C++ custom call of
`kernels/cpu/packed_linear.cc`.

The weight is packed once, at load time, into the layout every path reads (`pack_weight`);
`packed_linear(x, packed)` then serves every row count, a decode step's few rows and a prompt
chunk's hundreds alike, on AMX tiles, AVX-512 BF16 dot products, or bfloat16 widened to
float32 in registers, whichever this CPU has (`cpu_paths()` names them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from kernels.cpu_library import available, library, register

TARGET = "tessera_packed_linear"
K_STEP = 32  # K is padded with zero rows to a multiple of this
N_STEP = 16  # N must be a multiple of this
BLOCK_N = 32  # columns per packed block


@functools.cache
def cpu_paths() -> dict[str, object]:
    """What the packed product runs on this CPU: AMX tiles for prompt-sized row counts,
    AVX-512 BF16 dot products for decode rows, and the widening path's register width in
    floats (16 AVX-512, 8 AVX2); {} when the kernel library did not build."""
    if not available():
        return {}
    bits = int(library().TesseraPackedPaths())
    return {"amx_tiles": bool(bits & 1), "avx512_bf16": bool(bits & 2), "widen_lanes": bits >> 8}


def amx_ready() -> bool:
    return bool(cpu_paths().get("amx_tiles"))


def packable(w: Float[Array, "k n"]) -> bool:
    return w.ndim == 2 and w.shape[1] % N_STEP == 0


def pack_weight(w: Float[Array, "k n"]) -> Float[Array, "k2 two_n"]:
    """[K, N] -> bfloat16 [Kp / 2, 2 N] holding column blocks of 32 one after another (the
    last 16 wide when N % 32 == 16): block b is [Kp / 2, width, 2], whose row k2 holds
    (w[2 k2, n], w[2 k2 + 1, n]) for the block's columns n. K is padded with zero rows to Kp."""
    k, n = w.shape
    if n % N_STEP:
        raise ValueError(f"packing needs N a multiple of {N_STEP}, got {n}")
    kp = -(-k // K_STEP) * K_STEP
    pairs = jnp.pad(w.astype(jnp.bfloat16), ((0, kp - k), (0, 0))).reshape(kp // 2, 2, n).transpose(0, 2, 1)
    full = n // BLOCK_N * BLOCK_N  # [Kp / 2, N, 2] -> full blocks [N / 32, Kp / 2, 32, 2], then the tail
    blocks = pairs[:, :full].reshape(kp // 2, full // BLOCK_N, BLOCK_N, 2).transpose(1, 0, 2, 3)
    flat = jnp.concatenate([blocks.reshape(-1), pairs[:, full:].reshape(-1)])
    return flat.reshape(kp // 2, 2 * n)


def packed_linear(x: Float[Array, "rows k"], packed: Float[Array, "k2 two_n"], *, gated: bool = False) -> Float[Array, "rows n"]:
    """x [rows, K] @ the packed weight; the result has x's dtype, summed in float32 from
    bfloat16 operands (x is rounded to bfloat16). With `gated`, x is [rows, 2 K] holding
    (gate, up) and the product is silu(gate) * up @ W, the activation computed in float32."""
    register()
    if x.ndim != 2 or x.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"x must be a float32 or bfloat16 matrix, got {x.dtype}{list(x.shape)}")
    if gated and x.shape[1] % 2:
        raise ValueError(f"a gated x holds gate and up side by side: an even width, got {x.shape[1]}")
    k, kp = x.shape[1] // 2 if gated else x.shape[1], packed.shape[0] * 2
    if not kp - K_STEP < k <= kp:
        raise ValueError(f"x has {k} {'gate ' if gated else ''}columns but the packed weight holds K up to {kp}")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], packed.shape[1] // 2), x.dtype),
                            vmap_method="sequential")
    return call(x, packed, gated=gated)
