"""Writing a step's new keys and values into their cache pages."""

from __future__ import annotations

import jax
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
    them in place. (Indexed as (page, offset) rather than through a flattened view: XLA
    CPU copied the whole cache before a one-token write through the reshape.)"""
    pages, page_size = k_pages.shape[:2]
    slots = jnp.where(slot_mapping < 0, pages * page_size, slot_mapping)  # out of range: dropped
    page, offset = slots // page_size, slots % page_size
    k_pages = k_pages.at[page, offset].set(k_new.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[page, offset].set(v_new.astype(v_pages.dtype), mode="drop")
    return k_pages, v_pages


def write_kv_pages_cpu(
    k_pages: Float[Array, "pages page_size kv_heads head_dim"],
    v_pages: Float[Array, "pages page_size kv_heads head_dim"],
    k_new: Float[Array, "tokens kv_heads head_dim"],
    v_new: Float[Array, "tokens kv_heads head_dim"],
    slot_mapping: Int[Array, " tokens"],
) -> tuple[Float[Array, "pages page_size kv_heads head_dim"], Float[Array, "pages page_size kv_heads head_dim"]]:
    """`write_kv_pages_ref` as the in-place C++ call of `kernels/cpu/paged_kv_write.cc`: XLA
    CPU has no bfloat16 scatter and widened each layer's whole cache to float32 and back
    around a one-token write."""
    from kernels.cpu_library import register

    register()
    call = jax.ffi.ffi_call(
        "tessera_paged_kv_write",
        (jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype), jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)),
        input_output_aliases={0: 0, 1: 1},
        vmap_method="sequential",
    )
    return call(k_pages, v_pages, k_new.astype(k_pages.dtype), v_new.astype(v_pages.dtype),
                jnp.asarray(slot_mapping, jnp.int32))
