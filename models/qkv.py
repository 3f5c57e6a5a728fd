"""q, k and v from an attention layer's input: three products in the checkpoint layout, or one
against the weights side by side, which the loader lays out for one device."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from models.config import ModelConfig
from models.linear import QKV
from models.projection import Dense, Fp8Dense, Packed, SplitHeads, WeightLayout, placeholder
from models.rope import apply_rope


class SplitQKV(nnx.Module):
    """q, k and v by three products, each weight [embed, heads, head_dim]: the checkpoint layout,
    whose head axes shard by name."""

    def __init__(self, cfg: ModelConfig, dtype):
        e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = SplitHeads(placeholder((e, h, d), ("embed", "heads", "head_dim"), dtype))
        self.k_proj = SplitHeads(placeholder((e, k, d), ("embed", "kv_heads", "head_dim"), dtype))
        self.v_proj = SplitHeads(placeholder((e, k, d), ("embed", "kv_heads", "head_dim"), dtype))

    def __call__(self, x: Float[Array, "tokens embed"]) -> QKV:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def rotated(self, x: Float[Array, "tokens embed"], positions: Int[Array, " tokens"],
                inv_freq: Float[Array, " half"]) -> QKV:
        q, k, v = self(x)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def fused(self, layout: WeightLayout) -> FusedQKV:
        """The same weights side by side, in `layout` (models/loader.py `lay_out`)."""
        w = jnp.concatenate([p.kn() for p in (self.q_proj, self.k_proj, self.v_proj)], axis=1)
        heads, kv_heads = self.q_proj.weight.shape[1], self.k_proj.weight.shape[1]
        return FusedQKV(layout.projection(w), heads, kv_heads)


class FusedQKV(nnx.Module):
    """q, k and v by one product against [embed, (heads + 2 kv_heads) * head_dim]; with the CPU
    kernels the rotary embedding is applied in the same call."""

    def __init__(self, proj: Dense | Packed | Fp8Dense, heads: int, kv_heads: int):
        self.proj, self.heads, self.kv_heads = proj, heads, kv_heads

    def __call__(self, x: Float[Array, "tokens embed"]) -> QKV:
        qkv = self.proj(x)
        d = qkv.shape[1] // (self.heads + 2 * self.kv_heads)
        q, k, v = jnp.split(qkv, [self.heads * d, (self.heads + self.kv_heads) * d], axis=1)
        return q.reshape(x.shape[0], -1, d), k.reshape(x.shape[0], -1, d), v.reshape(x.shape[0], -1, d)

    def rotated(self, x: Float[Array, "tokens embed"], positions: Int[Array, " tokens"],
                inv_freq: Float[Array, " half"]) -> QKV:
        return self.proj.qkv_rope(x, positions, inv_freq, self.heads, self.kv_heads)
