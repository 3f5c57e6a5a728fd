"""The paged reference against plain dense attention computed sequence by sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.paged_kv_write import write_kv_pages_ref
from kernels.ragged_paged_attention_ref import ragged_paged_attention_ref

PAGE = 4


def _dense(q, k, v, q_pos, scale, window, soft_cap):
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


def _case(seed, q_lens, ctx_lens, heads, kv_heads, dim, dtype, window=None, soft_cap=None):
    rng = np.random.default_rng(seed)
    num_seqs, max_blocks = len(q_lens), max(-(-c // PAGE) for c in ctx_lens) + 1
    num_pages = num_seqs * max_blocks + 3
    pages = rng.permutation(num_pages)[: num_seqs * max_blocks].reshape(num_seqs, max_blocks)
    k_pages = rng.standard_normal((num_pages, PAGE, kv_heads, dim)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, PAGE, kv_heads, dim)).astype(np.float32)
    padded_tokens = sum(q_lens) + 3  # trailing padding tokens must come out as zeros
    q = rng.standard_normal((padded_tokens, heads, dim)).astype(np.float32)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    scale = dim**-0.5
    got = ragged_paged_attention_ref(
        jnp.asarray(q, dtype), jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype),
        jnp.asarray(pages, jnp.int32), jnp.asarray(ctx_lens, jnp.int32), jnp.asarray(qsl),
        sm_scale=scale, sliding_window=window, soft_cap=soft_cap,
    )
    want = np.zeros_like(q)
    as_dtype = lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))  # noqa: E731
    for s, (n, ctx) in enumerate(zip(q_lens, ctx_lens)):
        if n == 0:
            continue
        flat_k = as_dtype(k_pages)[pages[s]].reshape(-1, kv_heads, dim)[:ctx]
        flat_v = as_dtype(v_pages)[pages[s]].reshape(-1, kv_heads, dim)[:ctx]
        q_pos = np.arange(ctx - n, ctx)
        want[qsl[s] : qsl[s + 1]] = _dense(as_dtype(q)[qsl[s] : qsl[s + 1]], flat_k, flat_v, q_pos, scale, window, soft_cap)
    return np.asarray(got.astype(jnp.float32)), want


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (8, 1), (16, 2)])
@pytest.mark.parametrize("dim", [64, 128])
def test_ragged_batch_matches_dense(heads, kv_heads, dim):
    # A decode, a chunk crossing pages mid-context, an empty slot, a whole prefill.
    got, want = _case(heads * dim, [1, 6, 0, 9], [13, 10, 0, 9], heads, kv_heads, dim, jnp.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(got[16:] == 0)


def test_long_chunks_many_tiles_and_a_decode_after_the_chunks():
    # A 40-token chunk (the 128 window), a 33-token one, a decode placed after the chunks
    # (handled by the chunk path), a context of 300 tokens spanning two key tiles.
    got, want = _case(9, [1, 40, 33, 0, 1], [13, 50, 300, 0, 300], 8, 2, 64, jnp.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window, soft_cap", [(5, None), (None, 30.0), (3, 20.0)])
def test_window_and_soft_cap(window, soft_cap):
    got, want = _case(3, [1, 7, 2], [11, 7, 16], 8, 2, 64, jnp.float32, window, soft_cap)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_within_tolerance():
    got, want = _case(5, [3, 1, 8], [9, 20, 8], 8, 2, 128, jnp.bfloat16)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


def test_kv_write_places_tokens_and_drops_padding():
    k = jnp.zeros((3, PAGE, 1, 2))
    new = jnp.arange(8, dtype=jnp.float32).reshape(4, 1, 2) + 1
    slots = jnp.asarray([5, 0, 11, -1], jnp.int32)  # page 1 offset 1, page 0 offset 0, page 2 offset 3, padding
    k2, v2 = jax.jit(write_kv_pages_ref)(k, k, new, new, slots)
    flat = np.asarray(k2).reshape(12, 2)
    np.testing.assert_array_equal(flat[5], [1, 2])
    np.testing.assert_array_equal(flat[0], [3, 4])
    np.testing.assert_array_equal(flat[11], [5, 6])
    assert np.count_nonzero(flat) == 6  # the padding token wrote nothing
    np.testing.assert_array_equal(np.asarray(v2), np.asarray(k2))
