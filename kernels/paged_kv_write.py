"""Writing a step's new keys and values into their cache pages."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def write_kv_pages_ref(
    k_pages: Float[Array, "pages page_size kv_heads head_dim"],
    v_pages: Float[Array, "pages page_size kv_heads head_dim"],
    k_new: Float[Array, "tokens kv_heads head_dim"],
    v_new: Float[Array, "tokens kv_heads head_dim"],
    slot_mapping: Int[Array, " tokens"],
) -> tuple[Float[Array, "pages page_size kv_heads head_dim"], Float[Array, "pages page_size kv_heads head_dim"]]:
    """Scatter token t into slot slot_mapping[t] (= page * page_size + offset); a negative
    slot marks a padding token and writes nothing. With the pages donated, XLA updates
    them in place."""
    pages, page_size = k_pages.shape[:2]
    num_slots = pages * page_size
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)  # out of range: dropped
    flat_k = k_pages.reshape(num_slots, *k_pages.shape[2:]).at[slots].set(k_new.astype(k_pages.dtype), mode="drop")
    flat_v = v_pages.reshape(num_slots, *v_pages.shape[2:]).at[slots].set(v_new.astype(v_pages.dtype), mode="drop")
    return flat_k.reshape(k_pages.shape), flat_v.reshape(v_pages.shape)
