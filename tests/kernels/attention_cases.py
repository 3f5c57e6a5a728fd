"""Random ragged paged-attention batches and their answer from plain dense attention."""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np


@dataclass
class AttentionCase:
    q: jnp.ndarray  # [tokens, heads, head_dim]
    k_pages: jnp.ndarray  # [pages, page_size, kv_heads, head_dim]
    v_pages: jnp.ndarray
    block_tables: jnp.ndarray  # [seqs, max_blocks]
    context_lens: jnp.ndarray  # [seqs]
    query_start_loc: jnp.ndarray  # [seqs + 1]
    sm_scale: float
    want: np.ndarray  # float32 [tokens, heads, head_dim], zeros for padding tokens

    @property
    def arrays(self):
        return self.q, self.k_pages, self.v_pages, self.block_tables, self.context_lens, self.query_start_loc


def dense_attention(q, k, v, q_pos, scale, window, soft_cap):
    """q [n, H, D] at positions q_pos over k, v [ctx, KVH, D] (positions 0..ctx-1)."""
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.einsum("nhd,chd->hnc", q, k) * scale
    if soft_cap:
        s = soft_cap * np.tanh(s / soft_cap)
    kpos = np.arange(k.shape[0])
    ok = kpos[None, :] <= q_pos[:, None]
    if window:
        ok &= kpos[None, :] > q_pos[:, None] - window
    s = np.where(ok[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hnc,chd->nhd", p, v)


def make_case(seed, q_lens, ctx_lens, heads, kv_heads, dim, dtype, *, page_size=4, window=None, soft_cap=None,
              padding_tokens=3) -> AttentionCase:
    """Sequence s has q_lens[s] new tokens, the last of its ctx_lens[s]; its pages are drawn
    at random from the pool; `padding_tokens` trailing tokens belong to no sequence."""
    rng = np.random.default_rng(seed)
    num_seqs, max_blocks = len(q_lens), max(-(-c // page_size) for c in ctx_lens) + 1
    num_pages = num_seqs * max_blocks + 3
    pages = rng.permutation(num_pages)[: num_seqs * max_blocks].reshape(num_seqs, max_blocks)
    k_pages = rng.standard_normal((num_pages, page_size, kv_heads, dim)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, page_size, kv_heads, dim)).astype(np.float32)
    q = rng.standard_normal((sum(q_lens) + padding_tokens, heads, dim)).astype(np.float32)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    scale = dim**-0.5
    as_dtype = lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))  # noqa: E731
    want = np.zeros_like(q)
    for s, (n, ctx) in enumerate(zip(q_lens, ctx_lens)):
        if n == 0:
            continue
        flat_k = as_dtype(k_pages)[pages[s]].reshape(-1, kv_heads, dim)[:ctx]
        flat_v = as_dtype(v_pages)[pages[s]].reshape(-1, kv_heads, dim)[:ctx]
        q_pos = np.arange(ctx - n, ctx)
        want[qsl[s] : qsl[s + 1]] = dense_attention(
            as_dtype(q)[qsl[s] : qsl[s + 1]], flat_k, flat_v, q_pos, scale, window, soft_cap
        )
    return AttentionCase(
        jnp.asarray(q, dtype), jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype),
        jnp.asarray(pages, jnp.int32), jnp.asarray(ctx_lens, jnp.int32), jnp.asarray(qsl), scale, want,
    )


def relative_error(got, want) -> float:
    got = np.asarray(jnp.asarray(got).astype(jnp.float32))
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))
