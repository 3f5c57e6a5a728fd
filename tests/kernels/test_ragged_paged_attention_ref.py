"""The paged reference against plain dense attention computed sequence by sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.paged_kv_write import write_kv_pages_ref
from kernels.ragged_paged_attention_ref import ragged_paged_attention_ref

from tests.kernels.attention_cases import make_case

PAGE = 4


def _case(seed, q_lens, ctx_lens, heads, kv_heads, dim, dtype, window=None, soft_cap=None):
    case = make_case(seed, q_lens, ctx_lens, heads, kv_heads, dim, dtype, page_size=PAGE, window=window,
                     soft_cap=soft_cap)
    got = ragged_paged_attention_ref(*case.arrays, sm_scale=case.sm_scale, sliding_window=window, soft_cap=soft_cap)
    return np.asarray(got.astype(jnp.float32)), case.want


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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_kv_write_matches_the_reference_in_place(dtype):
    from kernels.paged_kv_write import write_kv_pages_cpu

    rng = np.random.default_rng(4)
    k = jnp.asarray(rng.standard_normal((5, PAGE, 2, 8)), dtype)
    v = jnp.asarray(rng.standard_normal((5, PAGE, 2, 8)), dtype)
    new_k = jnp.asarray(rng.standard_normal((6, 2, 8)), jnp.float32)
    new_v = jnp.asarray(rng.standard_normal((6, 2, 8)), jnp.float32)
    slots = jnp.asarray([5, 0, 19, -1, 7, 10_000], jnp.int32)  # two padding tokens: negative and past the pool
    want = jax.jit(write_kv_pages_ref)(k, v, new_k, new_v, slots)
    got = jax.jit(write_kv_pages_cpu, donate_argnums=(0, 1))(k.copy(), v.copy(), new_k, new_v, slots)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype
        np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(w.astype(jnp.float32)))
    flat = np.asarray(got[0].astype(jnp.float32)).reshape(-1, 2, 8)
    np.testing.assert_array_equal(flat[19], np.asarray(new_k[2].astype(dtype).astype(jnp.float32)))
