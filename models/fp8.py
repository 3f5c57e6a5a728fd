"""FP8 (e4m3) weights with one scale per output channel, and the product that reads them.

`quantize_fp8` turns an [in, out] weight of the checkpoint (bfloat16 or float32) into
float8_e4m3fn [out, in] and a float32 scale per output channel (its largest magnitude / 448),
once, at load (`models/loader.py` `lay_out`). Stored [out, in]: both operands of the product
then contract their last, contiguous axis, the "TN" layout cuBLAS' FP8 GEMM reads without a
transpose.

`fp8_linear` quantizes the activations too, per row (token) with a dynamic scale, and multiplies
float8 by float8 with float32 accumulation: on Hopper XLA hands that dot to cuBLASLt's FP8
GEMM, which reads the weight's 1 byte per value; elsewhere (the CPU) XLA widens the operands
and computes the same products exactly (an e4m3 x e4m3 product is exact in float32). The
result is scaled back by (row scale x channel scale) in float32, then rounded to the
activations' dtype. This is vLLM's `--quantization fp8` scheme with per-channel weight and
per-token activation scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
FP8 = jnp.float8_e4m3fn


def _scale(amax: Float[Array, "..."]) -> Float[Array, "..."]:
    # An all-zero row or channel gets scale 1: its values quantize to 0 either way.
    return jnp.where(amax > 0, amax / E4M3_MAX, 1.0)


def _to_fp8(x: Float[Array, "..."], scale: Float[Array, "..."]) -> Array:
    # Clipped first: float8_e4m3fn has no infinity, and a value rounding past 448 would be NaN.
    return jnp.clip(x / scale, -E4M3_MAX, E4M3_MAX).astype(FP8)


@jax.jit
def quantize_fp8(w: Float[Array, "k n"]) -> tuple[Array, Float[Array, " n"]]:
    """float8_e4m3fn [n, k] and the float32 scale of each of the n output channels."""
    wt = w.astype(jnp.float32).T
    scale = _scale(jnp.max(jnp.abs(wt), axis=1))
    return _to_fp8(wt, scale[:, None]), scale


def dequantize_fp8(w: Array, scale: Float[Array, " n"]) -> Float[Array, "k n"]:
    """The [k, n] float32 weight an fp8 one stands for (tests and checks)."""
    return (w.astype(jnp.float32) * scale[:, None]).T


def fp8_linear(x: Float[Array, "rows k"], w: Array, scale: Float[Array, " n"]) -> Float[Array, "rows n"]:
    """x @ dequantize(w, scale), with x quantized per row to e4m3 on the way: `w` is [n, k] float8."""
    xf = x.astype(jnp.float32)
    x_scale = _scale(jnp.max(jnp.abs(xf), axis=1, keepdims=True))  # [rows, 1]
    y = jax.lax.dot_general(_to_fp8(xf, x_scale), w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (y * x_scale * scale[None, :]).astype(x.dtype)
