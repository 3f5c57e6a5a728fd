"""The model's weight products, one function per weight layout, each exactly shaped.

`impl` says who computes a dense product: "xla", or "cpu" for the C++ small-batch kernel
(`kernels/cpu/linear.cc`) up to `MAX_ROWS` rows, XLA beyond: XLA CPU emulates bfloat16
products (~1.5 GB/s of weights on a decode step's shapes) and runs float32 matrix-vector
products on one thread (BUILD_NOTES.md), while prompt-sized products are XLA's strength.
Packed bfloat16 weights (`kernels/packed_linear.py`) go to the packed kernel at every row
count, on whatever this CPU has (AMX tiles, AVX-512 BF16, or bfloat16 widened in registers).

`models/projection.py` holds each weight in its layout and calls the matching function here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels.linear_cpu import MAX_ROWS, linear_cpu
from kernels.packed_linear import packed_linear
from kernels.qkv_rope_cpu import qkv_rope_cpu
from models.rope import apply_rope

QKV = tuple[Float[Array, "tokens heads d"], Float[Array, "tokens kv d"], Float[Array, "tokens kv d"]]


def _kernel_rows(x: Float[Array, "rows k"], impl: str) -> bool:
    return impl == "cpu" and x.shape[0] <= MAX_ROWS


def linear(x: Float[Array, "rows k"], w: Float[Array, "k n"], impl: str) -> Float[Array, "rows n"]:
    return linear_cpu(x, w) if _kernel_rows(x, impl) else x @ w


def linear_transposed(x: Float[Array, "rows k"], w: Float[Array, "n k"]) -> Float[Array, "rows n"]:
    return x @ w.T


def heads_linear(x: Float[Array, "rows k"], w: Float[Array, "k heads head_dim"]) -> Float[Array, "rows heads head_dim"]:
    return jnp.einsum("te,ehd->thd", x, w)


def merge_heads_linear(w: Float[Array, "heads head_dim n"], x: Float[Array, "rows heads*head_dim"]) -> Float[Array, "rows n"]:
    # One [rows, heads*head_dim] x [heads*head_dim, n] product: the weight's reshape is free,
    # where an einsum over (heads, head_dim) made XLA CPU transpose the weight every step.
    return x @ w.reshape(x.shape[1], -1)


def gated_linear(w: Float[Array, "m n"], gate_up: Float[Array, "rows 2*m"], impl: str) -> Float[Array, "rows n"]:
    """silu(gate) * up @ w, for gate_up = [gate | up] side by side (an MLP's down projection)."""
    m = w.shape[0]
    return linear(jax.nn.silu(gate_up[:, :m]) * gate_up[:, m:], w, impl)


def packed_gated_linear(w: Float[Array, "k2 two_n"], gate_up: Float[Array, "rows two_m"]) -> Float[Array, "rows n"]:
    """As `gated_linear` on a packed weight: the kernel computes the activation while it rounds
    its operand to bfloat16."""
    return packed_linear(gate_up, w, gated=True)


def qkv_with_rope(
    x: Float[Array, "tokens k"], w: Float[Array, "k n"], impl: str, positions: Int[Array, " tokens"],
    inv_freq: Float[Array, " half"], heads: int, kv_heads: int,
) -> QKV:
    """q and k rotated, and v, of a fused q/k/v projection: one kernel call when `impl` is "cpu"
    and the rows are few, else the product, the split and `apply_rope` in XLA."""
    if _kernel_rows(x, impl):
        return qkv_rope_cpu(x, w, *_cos_sin(x, positions, inv_freq), heads, kv_heads, packed=False)
    return split_qkv_rope(linear(x, w, impl), positions, inv_freq, heads, kv_heads)


def split_qkv_rope(qkv: Float[Array, "tokens n"], positions: Int[Array, " tokens"], inv_freq: Float[Array, " half"],
                   heads: int, kv_heads: int) -> QKV:
    """q and k rotated, and v, out of a fused q/k/v product's [q | k | v] columns."""
    d = 2 * inv_freq.shape[0]
    q, k, v = (part.reshape(qkv.shape[0], -1, d) for part in jnp.split(qkv, [heads * d, (heads + kv_heads) * d], axis=1))
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def packed_qkv_with_rope(
    x: Float[Array, "tokens k"], w: Float[Array, "k2 two_n"], positions: Int[Array, " tokens"],
    inv_freq: Float[Array, " half"], heads: int, kv_heads: int,
) -> QKV:
    return qkv_rope_cpu(x, w, *_cos_sin(x, positions, inv_freq), heads, kv_heads, packed=True)


def _cos_sin(x: Float[Array, "tokens k"], positions: Int[Array, " tokens"], inv_freq: Float[Array, " half"]):
    # Rounded to the activations' dtype first, as transformers (and apply_rope) do.
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return tuple(f(freqs).astype(x.dtype).astype(jnp.float32) for f in (jnp.cos, jnp.sin))
