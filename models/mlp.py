"""An MLP layer (SwiGLU): gate, up and down as three products in the checkpoint layout, or gate
and up as one, which the loader lays out for one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from models.config import ModelConfig
from models.lora import LoraLayer
from models.projection import Dense, Fp8Dense, Packed, WeightLayout, placeholder


class MLP(nnx.Module):
    """gate, up and down by three products: the checkpoint layout, whose MLP axis shards by name."""

    def __init__(self, cfg: ModelConfig, dtype):
        e, m = cfg.hidden_size, cfg.intermediate_size
        self.has_bias = cfg.mlp_bias
        self.gate_proj = Dense(placeholder((e, m), ("embed", "mlp"), dtype))
        self.up_proj = Dense(placeholder((e, m), ("embed", "mlp"), dtype))
        self.down_proj = Dense(placeholder((m, e), ("mlp", "embed"), dtype))
        if cfg.mlp_bias:
            self.gate_bias = placeholder((m,), ("mlp",), dtype)
            self.up_bias = placeholder((m,), ("mlp",), dtype)
            self.down_bias = placeholder((e,), ("embed",), dtype)

    def __call__(self, x: Float[Array, "tokens embed"], lora: LoraLayer | None = None) -> Float[Array, "tokens embed"]:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.has_bias:
            gate, up = gate + self.gate_bias[...], up + self.up_bias[...]
        if lora is not None:
            gate, up = gate + lora.delta("gate_proj", x), up + lora.delta("up_proj", x)
        h = jax.nn.silu(gate) * up
        y = self.down_proj(h)
        if lora is not None:
            y = y + lora.delta("down_proj", h)
        return y + self.down_bias[...] if self.has_bias else y

    def fused(self, layout: WeightLayout) -> FusedMLP:
        """The same weights with gate and up side by side, in `layout` (models/loader.py `lay_out`)."""
        gate_up = jnp.concatenate([self.gate_proj.kn(), self.up_proj.kn()], axis=1)
        biases = (self.gate_bias, self.up_bias, self.down_bias) if self.has_bias else None
        return FusedMLP(layout.projection(gate_up), layout.projection(self.down_proj.kn()), biases)


class FusedMLP(nnx.Module):
    """gate and up by one product against [embed, 2 mlp]; without biases the down projection
    takes [gate | up] whole, and the packed kernel computes silu(gate) * up as it reads it."""

    def __init__(self, gate_up_proj: Dense | Packed | Fp8Dense, down_proj: Dense | Packed | Fp8Dense,
                 biases: tuple[nnx.Param, nnx.Param, nnx.Param] | None):
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        self.has_bias = biases is not None
        if biases is not None:
            self.gate_bias, self.up_bias, self.down_bias = biases

    def __call__(self, x: Float[Array, "tokens embed"], lora: LoraLayer | None = None) -> Float[Array, "tokens embed"]:
        gate_up = self.gate_up_proj(x)
        if not self.has_bias and lora is None:
            return self.down_proj.gated(gate_up)
        m = gate_up.shape[1] // 2
        gate, up = gate_up[:, :m], gate_up[:, m:]
        if self.has_bias:
            gate, up = gate + self.gate_bias[...], up + self.up_bias[...]
        if lora is not None:  # the adapter's terms join before the activation, as in PEFT
            gate, up = gate + lora.delta("gate_proj", x), up + lora.delta("up_proj", x)
        h = jax.nn.silu(gate) * up
        y = self.down_proj(h)
        if lora is not None:
            y = y + lora.delta("down_proj", h)
        return y + self.down_bias[...] if self.has_bias else y
