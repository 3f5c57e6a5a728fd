"""Attention for a ragged batch of sequences over a paged KV cache.

A batch holds `seqs` sequences; sequence s brings q_len[s] = query_start_loc[s+1] -
query_start_loc[s] new tokens (1 while decoding, a chunk while prefilling), already written
into its pages, and attends to its first context_lens[s] cached tokens, causally: the new
tokens are the last q_len[s] of the context. Query tokens past query_start_loc[-1] are
padding and get zeros.

This file holds the pure-jnp reference that the CPU backend runs; the Pallas kernel for
GPUs (`ragged_paged_attention.py`) takes the same arguments. The reference has two paths, because one shape of work
does not suit both:
- decode tokens (sequences with one new token), which the scheduler puts first, are
  handled together, token by token, over tiles of their pages;
- prompt chunks are handled sequence by sequence: the chunk's queries against tiles of
  its context, as dense matrix products (a window of 32, 128 or all of the batch's tokens,
  whichever holds the chunk), so each page is read once per chunk rather than once per
  query token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

_NEG_INF = -1e30
KV_TILE_TOKENS = 256  # keys per tile: a tile is KV_TILE_TOKENS // page_size pages
_QUERY_WINDOWS = (32, 128)


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
    num_seqs, max_blocks = block_tables.shape
    pages_per_tile = max(1, min(max_blocks, KV_TILE_TOKENS // page_size))
    num_tiles = -(-max_blocks // pages_per_tile)
    tables = jnp.pad(block_tables, ((0, 0), (0, num_tiles * pages_per_tile - max_blocks)))
    geometry = _Geometry(num_kv_heads, num_heads // num_kv_heads, head_dim, page_size, pages_per_tile)
    scores_fn = functools.partial(_masked_scores, sliding_window=sliding_window, soft_cap=soft_cap)

    q_len = query_start_loc[1:] - query_start_loc[:-1]
    qf = q.astype(jnp.float32) * sm_scale
    decode_span = min(num_tokens, num_seqs)  # decodes come first, at most one token per sequence
    out = _decode_tokens(qf[:decode_span], k_pages, v_pages, tables, context_lens, query_start_loc, q_len,
                         geometry, scores_fn)
    windows = sorted({min(w, num_tokens) for w in (*_QUERY_WINDOWS, num_tokens)})
    pad = windows[-1]
    out = jnp.concatenate([out, jnp.zeros((num_tokens - decode_span + pad, num_heads, head_dim), jnp.float32)])
    qf = jnp.concatenate([qf, jnp.zeros((pad, num_heads, head_dim), jnp.float32)])

    def per_sequence(s, out):
        start, n = query_start_loc[s], q_len[s]
        done_by_decode_path = (n == 1) & (start < decode_span)
        branch = jnp.where((n == 0) | done_by_decode_path, 0, 1 + jnp.searchsorted(jnp.asarray(windows), n))
        chunk_fns = [lambda out: out] + [
            functools.partial(_chunk, w, s, qf, k_pages, v_pages, tables, context_lens, query_start_loc, q_len,
                              geometry, scores_fn)
            for w in windows
        ]
        return jax.lax.switch(branch, chunk_fns, out)

    out = jax.lax.fori_loop(0, num_seqs, per_sequence, out)
    real = jnp.arange(num_tokens) < query_start_loc[num_seqs]
    return jnp.where(real[:, None, None], out[:num_tokens], 0.0).astype(q.dtype)


class _Geometry:
    def __init__(self, kv_heads, group, head_dim, page_size, pages_per_tile):
        self.kv_heads, self.group, self.head_dim = kv_heads, group, head_dim
        self.page_size, self.pages_per_tile = page_size, pages_per_tile
        self.tile = page_size * pages_per_tile


def _masked_scores(scores, q_pos, k_pos, kv_len, *, sliding_window, soft_cap):
    """scores [..., queries, keys]; q_pos [queries]; k_pos [keys]; kv_len broadcastable to q_pos."""
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < kv_len[:, None])
    if sliding_window is not None:
        visible &= k_pos[None, :] > q_pos[:, None] - sliding_window
    return jnp.where(visible, scores, _NEG_INF), visible


def _softmax_start(g: _Geometry, rows: int):
    """(accumulator, running max, running sum) of an online softmax over `rows` queries."""
    return (
        jnp.zeros((g.kv_heads, g.group, rows, g.head_dim), jnp.float32),
        jnp.full((g.kv_heads, g.group, rows), _NEG_INF, jnp.float32),
        jnp.zeros((g.kv_heads, g.group, rows), jnp.float32),
    )


def _normalized(state, g: _Geometry):
    """[rows, heads, head_dim] from the final online-softmax state; rows that saw no key get 0."""
    acc, _, row_sum = state
    out = acc / jnp.where(row_sum > 0, row_sum, 1.0)[..., None]
    return out.transpose(2, 0, 1, 3).reshape(out.shape[2], g.kv_heads * g.group, g.head_dim)


def _online_softmax_update(carry, scores, visible, values_fn):
    acc, row_max, row_sum = carry
    new_max = jnp.maximum(row_max, scores.max(axis=-1))
    probs = jnp.where(visible, jnp.exp(scores - new_max[..., None]), 0.0)
    rescale = jnp.exp(row_max - new_max)
    acc = acc * rescale[..., None] + values_fn(probs)
    return acc, new_max, row_sum * rescale + probs.sum(axis=-1)


def _decode_tokens(qf, k_pages, v_pages, tables, context_lens, query_start_loc, q_len, g: _Geometry, scores_fn):
    """Token-centric path for the first tokens of the batch; exact for tokens of one-token sequences."""
    n = qf.shape[0]
    token = jnp.arange(n, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(query_start_loc[1:], token, side="right"), 0, tables.shape[0] - 1)
    is_decode = (q_len[seq] == 1) & (query_start_loc[seq] == token)
    kv_len = jnp.where(is_decode, context_lens[seq], 0)
    q_pos = kv_len - 1
    qg = qf.reshape(n, g.kv_heads, g.group, g.head_dim)
    num_tiles = (jnp.max(kv_len, initial=0) + g.tile - 1) // g.tile

    def visit(j, carry):
        ids = jax.lax.dynamic_slice_in_dim(tables[seq], j * g.pages_per_tile, g.pages_per_tile, axis=1)
        k = k_pages[ids].reshape(n, g.tile, g.kv_heads, g.head_dim).astype(jnp.float32)
        v = v_pages[ids].reshape(n, g.tile, g.kv_heads, g.head_dim).astype(jnp.float32)
        k_pos = j * g.tile + jnp.arange(g.tile, dtype=jnp.int32)
        scores = jnp.einsum("tkgd,tckd->kgtc", qg, k)  # each token is its own query row
        scores, visible = scores_fn(scores, q_pos, k_pos, kv_len)
        return _online_softmax_update(carry, scores, visible, lambda p: jnp.einsum("kgtc,tckd->kgtd", p, v))

    return _normalized(jax.lax.fori_loop(0, num_tiles, visit, _softmax_start(g, n)), g)


def _chunk(window, s, qf, k_pages, v_pages, tables, context_lens, query_start_loc, q_len, g: _Geometry, scores_fn, out):
    """Sequence s's chunk (at most `window` queries) against its context, tile by tile.

    Laid out per KV head as [kv_heads, window * group, head_dim] query rows (row = token *
    group + head in group), so each tile is one batched [rows, D] x [D, keys] product per KV
    head rather than a product over interleaved token and head axes."""
    start, n, kv_len = query_start_loc[s], q_len[s], context_lens[s]
    rows = window * g.group
    qs = jax.lax.dynamic_slice_in_dim(qf, start, window).reshape(window, g.kv_heads, g.group, g.head_dim)
    qs = qs.transpose(1, 0, 2, 3).reshape(g.kv_heads, rows, g.head_dim)
    q_pos = jnp.repeat(kv_len - n + jnp.arange(window, dtype=jnp.int32), g.group)
    lens = jnp.full((rows,), kv_len)
    row = tables[s]

    def visit(j, carry):
        ids = jax.lax.dynamic_slice_in_dim(row, j * g.pages_per_tile, g.pages_per_tile)
        k = k_pages[ids].reshape(g.tile, g.kv_heads, g.head_dim).astype(jnp.float32).transpose(1, 0, 2)
        v = v_pages[ids].reshape(g.tile, g.kv_heads, g.head_dim).astype(jnp.float32).transpose(1, 0, 2)
        k_pos = j * g.tile + jnp.arange(g.tile, dtype=jnp.int32)
        scores = jnp.einsum("kmd,kcd->kmc", qs, k)
        scores, visible = scores_fn(scores, q_pos, k_pos, lens)
        return _online_softmax_update(carry, scores, visible, lambda p: jnp.einsum("kmc,kcd->kmd", p, v))

    start_state = (
        jnp.zeros((g.kv_heads, rows, g.head_dim), jnp.float32),
        jnp.full((g.kv_heads, rows), _NEG_INF, jnp.float32),
        jnp.zeros((g.kv_heads, rows), jnp.float32),
    )
    acc, _, row_sum = jax.lax.fori_loop(0, (kv_len + g.tile - 1) // g.tile, visit, start_state)
    result = acc / jnp.where(row_sum > 0, row_sum, 1.0)[..., None]
    result = result.reshape(g.kv_heads, window, g.group, g.head_dim).transpose(1, 0, 2, 3)
    result = result.reshape(window, g.kv_heads * g.group, g.head_dim)
    current = jax.lax.dynamic_slice_in_dim(out, start, window)
    mine = (jnp.arange(window) < n)[:, None, None]
    return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mine, result, current), start, axis=0)
