"""Fusing a loaded model's parallel projections for single-device serving.

q, k and v read the same input, as do the MLP's gate and up: one product against the
weights laid side by side streams the same bytes in two calls fewer per layer. On the 2-core
CPU machine that made a 30-layer chain of decode matrix-vector products ~15% faster
(BUILD_NOTES.md). Only for a one-device mesh: with tensor parallelism each weight is split
by heads or MLP columns, which a concatenated weight would not follow.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from models.loader import LoadedModel


def fuse_projections(model: LoadedModel) -> LoadedModel:
    """The same model with `qkv_proj` [embed, (heads + 2 kv_heads) * head_dim] in place of
    q/k/v_proj and `gate_up_proj` [embed, 2 * mlp] in place of gate/up_proj, per layer.
    Returns the model unchanged on a multi-device mesh, or when it is fused already."""
    if model.mesh.size != 1:
        return model
    module = nnx.merge(model.graphdef, model.state)
    if hasattr(module.layers[0].self_attn, "qkv_proj"):
        return model
    for layer in module.layers:
        attn, mlp = layer.self_attn, layer.mlp
        e = attn.q_proj.shape[0]
        attn.qkv_proj = nnx.Param(jnp.concatenate(
            [attn.q_proj[...].reshape(e, -1), attn.k_proj[...].reshape(e, -1), attn.v_proj[...].reshape(e, -1)], axis=1))
        del attn.q_proj, attn.k_proj, attn.v_proj
        mlp.gate_up_proj = nnx.Param(jnp.concatenate([mlp.gate_proj[...], mlp.up_proj[...]], axis=1))
        del mlp.gate_proj, mlp.up_proj
    graphdef, state = nnx.split(module)
    return dataclasses.replace(model, graphdef=graphdef, state=state)
