"""Dense causal attention over one whole sequence, with no KV cache.

The serving path attends over the paged cache (kernels/); this one serves training and
scoring, where every position of a sequence is computed at once and gradients must flow
(the paged reference loops with data-dependent trip counts, which reverse mode cannot
differentiate). It takes the same q/k/v the model's Attention module projects, so the
trained weights are the served ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

_NEG_INF = -1e30


def causal_attention(
    q: Float[Array, "tokens heads head_dim"],
    k: Float[Array, "tokens kv_heads head_dim"],
    v: Float[Array, "tokens kv_heads head_dim"],
    *,
    sm_scale: float,
    sliding_window: int | None = None,
) -> Float[Array, "tokens heads head_dim"]:
    """Token t attends to tokens 0..t (the last `sliding_window` of them, if set); softmax in float32."""
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    qg = q.astype(jnp.float32).reshape(tokens, kv_heads, heads // kv_heads, head_dim) * sm_scale
    scores = jnp.einsum("tkgd,skd->kgts", qg, k.astype(jnp.float32))  # [kv_heads, group, queries, keys]
    pos = jnp.arange(tokens)
    visible = pos[None, :] <= pos[:, None]
    if sliding_window is not None:
        visible &= pos[None, :] > pos[:, None] - sliding_window
    probs = jax.nn.softmax(jnp.where(visible, scores, _NEG_INF), axis=-1)
    out = jnp.einsum("kgts,skd->tkgd", probs, v.astype(jnp.float32))
    return out.reshape(tokens, heads, head_dim).astype(q.dtype)
