"""Attention for a ragged batch of sequences over a paged KV cache.

A batch holds `seqs` sequences; sequence s brings q_len[s] = query_start_loc[s+1] -
query_start_loc[s] new tokens (1 while decoding, a chunk while prefilling), already written
into its pages, and attends to its first context_lens[s] cached tokens, causally: the new
tokens are the last q_len[s] of the context. Query tokens past query_start_loc[-1] are
padding and get zeros.

This file holds the pure-jnp reference that the CPU backend runs; the Pallas kernel for
GPUs takes the same arguments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

_NEG_INF = -1e30


def ragged_paged_attention_ref(
    q: Float[Array, "tokens heads head_dim"],
    k_pages: Float[Array, "pages page_size kv_heads head_dim"],
    v_pages: Float[Array, "pages page_size kv_heads head_dim"],
    block_tables: Int[Array, "seqs max_blocks"],
    context_lens: Int[Array, " seqs"],
    query_start_loc: Int[Array, " seqs_plus_one"],
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> Float[Array, "tokens heads head_dim"]:
    num_tokens, num_heads, head_dim = q.shape
    page_size, num_kv_heads = k_pages.shape[1], k_pages.shape[2]
    group = num_heads // num_kv_heads
    num_seqs = block_tables.shape[0]

    token = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(query_start_loc[1:], token, side="right"), 0, num_seqs - 1)
    is_real = token < query_start_loc[num_seqs]
    kv_len = jnp.where(is_real, context_lens[seq], 0)  # [tokens]
    q_pos = kv_len - (query_start_loc[seq + 1] - token)  # absolute position of each query
    tables = block_tables[seq]  # [tokens, max_blocks]

    qg = (q.astype(jnp.float32) * sm_scale).reshape(num_tokens, num_kv_heads, group, head_dim)
    num_blocks = (jnp.max(kv_len) + page_size - 1) // page_size

    def visit_block(b, carry):
        acc, row_max, row_sum = carry
        k = k_pages[tables[:, b]].astype(jnp.float32)  # [tokens, page_size, kv_heads, head_dim]
        v = v_pages[tables[:, b]].astype(jnp.float32)
        scores = jnp.einsum("tkgd,tpkd->tkgp", qg, k)
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        k_pos = b * page_size + jnp.arange(page_size, dtype=jnp.int32)
        visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < kv_len[:, None])
        if sliding_window is not None:
            visible &= k_pos[None, :] > q_pos[:, None] - sliding_window
        scores = jnp.where(visible[:, None, None, :], scores, _NEG_INF)
        new_max = jnp.maximum(row_max, scores.max(axis=-1))
        probs = jnp.exp(scores - new_max[..., None])
        probs = jnp.where(visible[:, None, None, :], probs, 0.0)
        rescale = jnp.exp(row_max - new_max)
        acc = acc * rescale[..., None] + jnp.einsum("tkgp,tpkd->tkgd", probs, v)
        return acc, new_max, row_sum * rescale + probs.sum(axis=-1)

    init = (
        jnp.zeros((num_tokens, num_kv_heads, group, head_dim), jnp.float32),
        jnp.full((num_tokens, num_kv_heads, group), _NEG_INF, jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group), jnp.float32),
    )
    acc, _, row_sum = jax.lax.fori_loop(0, num_blocks, visit_block, init)
    out = acc / jnp.where(row_sum > 0, row_sum, 1.0)[..., None]
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
