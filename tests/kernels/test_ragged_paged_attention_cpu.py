"""The C++ CPU attention kernel against plain dense attention and against the jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.ragged_paged_attention_cpu import ragged_paged_attention_cpu
from kernels.ragged_paged_attention_ref import ragged_paged_attention_ref

from tests.kernels.attention_cases import make_case, relative_error


def _run(case, **kw):
    fn = jax.jit(lambda *a: ragged_paged_attention_cpu(*a, sm_scale=case.sm_scale, **kw))
    return np.asarray(fn(*case.arrays).astype(jnp.float32))


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (9, 3), (8, 1), (16, 2)])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("page_size", [4, 16])
def test_ragged_batch_matches_dense(heads, kv_heads, dim, page_size):
    # A decode, a chunk crossing pages mid-context, an empty slot, a whole prefill, 3 padding tokens.
    case = make_case(heads * dim + page_size, [1, 6, 0, 9], [13, 10, 0, 9], heads, kv_heads, dim, jnp.float32,
                     page_size=page_size)
    got = _run(case)
    np.testing.assert_allclose(got, case.want, rtol=2e-5, atol=2e-5)
    assert np.all(got[16:] == 0)


def test_long_chunks_cross_key_and_query_tiles():
    # A 40-token chunk (three query runs), a 33-token one, a decode after the chunks, a context of
    # 300 keys (five key tiles, the last partial), and many decodes sharing one call.
    q_lens = [1, 40, 33, 0, 1] + [1] * 11
    ctx = [13, 50, 300, 0, 300] + [5 + 37 * i for i in range(11)]
    case = make_case(9, q_lens, ctx, 8, 2, 64, jnp.float32, page_size=16)
    np.testing.assert_allclose(_run(case), case.want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("window, soft_cap", [(5, None), (None, 30.0), (3, 20.0), (70, None)])
def test_window_and_soft_cap(window, soft_cap):
    case = make_case(3, [1, 7, 2, 20], [11, 7, 16, 150], 8, 2, 64, jnp.float32, window=window, soft_cap=soft_cap)
    np.testing.assert_allclose(_run(case, sliding_window=window, soft_cap=soft_cap), case.want, rtol=2e-5, atol=2e-5)


def test_bfloat16_pages_and_queries():
    case = make_case(5, [3, 1, 8], [9, 20, 8], 8, 2, 128, jnp.bfloat16)
    fn = jax.jit(lambda *a: ragged_paged_attention_cpu(*a, sm_scale=case.sm_scale))
    got = fn(*case.arrays)
    assert got.dtype == jnp.bfloat16
    assert relative_error(got, case.want) < 1e-2


@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (8, 1), (4, 4)])
@pytest.mark.parametrize("dim", [64, 96, 128, 80])
@pytest.mark.parametrize("window, soft_cap", [(None, None), (37, None), (None, 30.0)])
def test_bfloat16_prompt_chunks(heads, kv_heads, dim, window, soft_cap):
    # Prompt chunks take the AMX tile path where the CPU has it (head_dim a multiple of 32; 80
    # stays on the vector path): runs of 40 and 33 tokens over 5 key tiles (the last partial),
    # a decode, an empty slot, a 5-token prefill whose rows do not fill a tile.
    case = make_case(dim + heads, [1, 40, 33, 0, 5], [13, 50, 300, 0, 5], heads, kv_heads, dim, jnp.bfloat16,
                     page_size=16, window=window, soft_cap=soft_cap)
    fn = jax.jit(lambda *a: ragged_paged_attention_cpu(*a, sm_scale=case.sm_scale, sliding_window=window,
                                                       soft_cap=soft_cap))
    got = np.asarray(fn(*case.arrays).astype(jnp.float32))
    assert relative_error(got, case.want) < 1e-2
    assert np.all(got[79:] == 0)  # the padding tokens


def test_agrees_with_the_reference_on_a_mixed_batch():
    case = make_case(11, [1, 1, 1, 24, 5], [40, 7, 129, 60, 5], 12, 4, 64, jnp.float32, page_size=8)
    mine = _run(case)
    ref = np.asarray(jax.jit(lambda *a: ragged_paged_attention_ref(*a, sm_scale=case.sm_scale))(*case.arrays))
    np.testing.assert_allclose(mine, ref, rtol=2e-5, atol=2e-5)


def test_out_of_range_metadata_gives_zeros_not_a_crash():
    # Page ids past the pool are clamped, starts past the batch are cut back to its end.
    case = make_case(2, [2, 1], [6, 3], 4, 2, 64, jnp.float32)
    tables = np.asarray(case.block_tables).copy()
    tables[1, 0] = 10_000
    qsl = np.asarray([0, 2, 10_000], np.int32)
    fn = jax.jit(lambda *a: ragged_paged_attention_cpu(*a, sm_scale=case.sm_scale))
    got = np.asarray(fn(case.q, case.k_pages, case.v_pages, tables, case.context_lens, qsl))
    np.testing.assert_allclose(got[:2], case.want[:2], rtol=2e-5, atol=2e-5)
    assert np.isfinite(got).all()


def test_loading_the_library_leaves_subnormals_alone():
    # Built with -ffast-math but linked without it: no crtfastmath.o flushing denormals process-wide.
    from kernels.ragged_paged_attention_cpu import available

    assert available()
    assert np.float32(1e-38) / np.float32(100) > 0


def test_mismatched_page_dtypes_are_refused():
    case = make_case(1, [1], [4], 4, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="share a dtype"):
        ragged_paged_attention_cpu(case.q, case.k_pages, case.v_pages.astype(jnp.bfloat16), case.block_tables,
                                   case.context_lens, case.query_start_loc, sm_scale=case.sm_scale)
