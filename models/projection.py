"""A projection: one weight in one declared layout, and the product that reads it.

The model calls `proj(x)` and never asks which layout a weight is in; the class is the layout.
The checkpoint layout, which the loader reads on any mesh (its axes are sharded by name):
- `SplitHeads` [in, heads, head_dim]: q, k, v;
- `MergeHeads` [heads, head_dim, out]: o;
- `Dense` [in, out]: gate, up, down, an untied head;
- `Transposed` [out, in]: a tied head, which is the embedding table itself.
On one device the execution plan's `WeightLayout` lays the weights out again at load
(`models/loader.py` `lay_out`): q/k/v and gate/up side by side, each weight a `Dense` read
by XLA or the CPU small-batch kernel, a `Packed` bfloat16 weight for the packed kernel, or
an `Fp8Dense` float8 weight with a scale per output channel (`--quantization fp8`).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from kernels.packed_linear import N_STEP, pack_weight, packed_linear
from models.config import ModelConfig
from models.fp8 import fp8_linear, quantize_fp8
from models.linear import (
    QKV,
    gated_linear,
    heads_linear,
    linear,
    linear_transposed,
    merge_heads_linear,
    packed_gated_linear,
    packed_qkv_with_rope,
    qkv_with_rope,
    split_qkv_rope,
)

LINEAR_IMPLS = ("xla", "cpu", "packed")
QUANTIZATIONS = ("fp8",)


@dataclass(frozen=True)
class WeightLayout:
    """How the served model's projections are laid out, and which products read them."""

    linear: str = "xla"
    """"xla"; "cpu": the C++ small-batch kernel up to MAX_ROWS rows (a tied head gets an
    [embed, vocab] copy, which it streams faster); "packed": bfloat16 weights packed for the
    packed kernel, every row count."""
    fused: bool = False
    """q/k/v and gate/up as one weight each: one product streams what two or three did. One
    device only: a concatenated weight does not split by heads or MLP columns."""
    quantization: str | None = None
    """None: weights in the model's dtype; "fp8": the projections of every layer as float8_e4m3fn
    with a scale per output channel (models/fp8.py), made at load. The embedding and the head
    keep the model's dtype (as vLLM's fp8 leaves them): they decide every token."""

    def __post_init__(self):
        if self.linear not in LINEAR_IMPLS:
            raise ValueError(f"linear={self.linear!r} is unknown; choose one of {', '.join(LINEAR_IMPLS)}")
        if self.linear != "xla" and not self.fused:
            raise ValueError(f"the {self.linear!r} products serve fused weights (one device)")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization={self.quantization!r} is unknown; choose one of {', '.join(QUANTIZATIONS)}")
        if self.quantization is not None and (self.linear != "xla" or not self.fused):
            raise ValueError(f"{self.quantization} weights are fused (one device) and read by XLA's products, "
                             f"not linear={self.linear!r} fused={self.fused}")

    @property
    def name(self) -> str:
        """How the bytes of each weight are arranged: "dense" arrays in the model's dtype, "packed", or "fp8"."""
        if self.quantization is not None:
            return self.quantization
        return "packed" if self.linear == "packed" else "dense"

    def projection(self, w: Float[Array, "k n"]) -> Dense | Packed | Fp8Dense:
        """A served projection of the [in, out] weight `w`."""
        if self.quantization == "fp8":
            return Fp8Dense(*(nnx.Param(a) for a in quantize_fp8(w)))
        if self.linear == "packed":
            return Packed(nnx.Param(pack_weight(w)))
        return Dense(nnx.Param(w), self.linear)


CHECKPOINT_LAYOUT = WeightLayout()


def packable(cfg: ModelConfig) -> bool:
    """Whether every weight of the fused model packs: the kernel needs output widths that are
    multiples of N_STEP (q/k/v, o, gate/up, down, the head)."""
    widths = ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, cfg.hidden_size, 2 * cfg.intermediate_size,
              cfg.vocab_size)
    return all(n % N_STEP == 0 for n in widths)


def placeholder(shape: tuple[int, ...], axes: tuple[str, ...], dtype, fill: float = 0.0) -> nnx.Param:
    """A weight of the checkpoint layout before the loader fills it: its shape and logical axes."""
    return nnx.Param(jnp.full(shape, fill, dtype), sharding_names=axes, eager_sharding=False)


class Projection(nnx.Module):
    def __init__(self, weight: nnx.Param):
        self.weight = weight


class SplitHeads(Projection):
    """[in, heads, head_dim]: q, k or v with a head axis to shard by."""

    def __call__(self, x: Float[Array, "rows k"]) -> Float[Array, "rows heads head_dim"]:
        return heads_linear(x, self.weight[...])

    def kn(self) -> Float[Array, "k n"]:
        w = self.weight[...]
        return w.reshape(w.shape[0], -1)


class MergeHeads(Projection):
    """[heads, head_dim, out]: o, reading the attention output with its heads side by side."""

    def __call__(self, x: Float[Array, "rows k"]) -> Float[Array, "rows n"]:
        return merge_heads_linear(self.weight[...], x)

    def kn(self) -> Float[Array, "k n"]:
        w = self.weight[...]
        return w.reshape(-1, w.shape[-1])


class Transposed(Projection):
    """[out, in]: a tied head, the embedding table read as the output projection."""

    def __call__(self, x: Float[Array, "rows k"]) -> Float[Array, "rows n"]:
        return linear_transposed(x, self.weight[...])

    def kn(self) -> Float[Array, "k n"]:
        return self.weight[...].T


class Dense(Projection):
    """[in, out] in the model's dtype; `impl` "xla", or "cpu" (`models/linear.py`)."""

    def __init__(self, weight: nnx.Param, impl: str = "xla"):
        super().__init__(weight)
        self.impl = impl

    def __call__(self, x: Float[Array, "rows k"]) -> Float[Array, "rows n"]:
        return linear(x, self.weight[...], self.impl)

    def kn(self) -> Float[Array, "k n"]:
        return self.weight[...]

    def gated(self, gate_up: Float[Array, "rows two_m"]) -> Float[Array, "rows n"]:
        return gated_linear(self.weight[...], gate_up, self.impl)

    def qkv_rope(self, x: Float[Array, "tokens k"], positions: Int[Array, " tokens"], inv_freq: Float[Array, " half"],
                 heads: int, kv_heads: int) -> QKV:
        return qkv_with_rope(x, self.weight[...], self.impl, positions, inv_freq, heads, kv_heads)


class Packed(Projection):
    """bfloat16 [Kp / 2, 2 N] in 32-column blocks (`kernels/packed_linear.py`), for the packed kernel."""

    def __call__(self, x: Float[Array, "rows k"]) -> Float[Array, "rows n"]:
        return packed_linear(x, self.weight[...])

    def gated(self, gate_up: Float[Array, "rows two_m"]) -> Float[Array, "rows n"]:
        return packed_gated_linear(self.weight[...], gate_up)

    def qkv_rope(self, x: Float[Array, "tokens k"], positions: Int[Array, " tokens"], inv_freq: Float[Array, " half"],
                 heads: int, kv_heads: int) -> QKV:
        return packed_qkv_with_rope(x, self.weight[...], positions, inv_freq, heads, kv_heads)


class Fp8Dense(Projection):
    """float8_e4m3fn [out, in] with a float32 scale per output channel (`models/fp8.py`), read by
    an FP8 product; the activations are quantized per token on the way in."""

    def __init__(self, weight: nnx.Param, scale: nnx.Param):
        super().__init__(weight)
        self.scale = scale  # [out]

    def __call__(self, x: Float[Array, "rows k"]) -> Float[Array, "rows n"]:
        return fp8_linear(x, self.weight[...], self.scale[...])

    def gated(self, gate_up: Float[Array, "rows two_m"]) -> Float[Array, "rows n"]:
        m = gate_up.shape[1] // 2
        return self(jax.nn.silu(gate_up[:, :m]) * gate_up[:, m:])

    def qkv_rope(self, x: Float[Array, "tokens k"], positions: Int[Array, " tokens"], inv_freq: Float[Array, " half"],
                 heads: int, kv_heads: int) -> QKV:
        return split_qkv_rope(self(x), positions, inv_freq, heads, kv_heads)
