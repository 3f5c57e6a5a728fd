"""The Pallas kernel, run in interpret mode on CPU, against plain dense attention; and its
Triton lowering for CUDA, which runs on this CPU machine too (only compiling it needs a GPU).

Every run starts the result filled with NaN, so a row no program wrote shows up. Tolerances
are relative (Frobenius) errors: float32 runs the products at full precision; bfloat16 rounds
the softmax weights to bfloat16 before the value product, as the GPU does."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention_work import MERGE_COUNT, work_table
from kernels.ragged_paged_attention import (
    UnsupportedAttentionShape, check_supported, plan_for, ragged_paged_attention,
)
from kernels.ragged_paged_attention_ref import ragged_paged_attention_ref
from tests.kernels.attention_cases import make_case, relative_error

TOLERANCE = {jnp.float32: 2e-6, jnp.bfloat16: 4e-3}


def _run(case, **kwargs):
    out = ragged_paged_attention(*case.arrays, sm_scale=case.sm_scale, interpret=True, poison=float("nan"), **kwargs)
    out = np.asarray(out.astype(jnp.float32))
    assert not np.isnan(out).any()
    return out


def _plan(case, decode_only=False):
    tokens, heads, dim = case.q.shape
    _, page, kv_heads, _ = case.k_pages.shape
    return plan_for(tokens, case.block_tables.shape[0], heads, kv_heads, dim, page, case.k_pages.dtype, decode_only)


def _table(case, decode_only=False):
    return work_table(_plan(case, decode_only), np.asarray(case.query_start_loc), np.asarray(case.context_lens))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 4, 64), (8, 4, 128), (12, 3, 64), (16, 2, 128), (6, 2, 128)])
def test_mixed_batch_matches_dense(heads, kv_heads, dim, dtype):
    # Decodes (the 130-token one split over two entries), a chunk crossing pages in
    # mid-context, an empty slot, a whole prefill, and trailing padding tokens; page size 8.
    q_lens = [1, 1, 19, 0, 33, 1]
    case = make_case(heads * dim, q_lens, [40, 9, 27, 0, 33, 130], heads, kv_heads, dim, dtype, page_size=8)
    out = _run(case)
    assert relative_error(out, case.want) < TOLERANCE[dtype]
    assert np.all(out[sum(q_lens):] == 0)


@pytest.mark.parametrize("decode_only", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_only_batch(decode_only, dtype):
    # An empty slot between decodes, and 3 padding tokens: with decode_only there is no chunk
    # pass and decode entries zero the padding.
    case = make_case(7, [1, 1, 0, 1], [70, 1, 0, 16], 8, 1, 128, dtype, page_size=16)
    plan = _plan(case, decode_only)
    assert plan.chunk_entries == (0 if decode_only else 5)
    out = _run(case, decode_only=decode_only)
    assert relative_error(out, case.want) < TOLERANCE[dtype]
    assert np.all(out[3:] == 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_token_step_splits_its_context_sixteen_ways(dtype):
    case = make_case(11, [1], [2000], 8, 2, 64, dtype, page_size=16, padding_tokens=0)
    table = _table(case)
    assert _plan(case).chunk_entries == 0 and table[0, MERGE_COUNT] == 16
    assert relative_error(_run(case), case.want) < TOLERANCE[dtype]


def test_split_and_unsplit_decodes_in_one_step():
    # 33 decodes in 64 entries: one entry each. 3 decodes: up to 16 each, one per 128-key block.
    ctx = [5 + 37 * i for i in range(33)]
    many = make_case(12, [1] * 33, ctx, 8, 2, 64, jnp.float32, page_size=8, padding_tokens=0)
    assert np.all(_table(many)[:33, MERGE_COUNT] == 1)
    assert relative_error(_run(many), many.want) < TOLERANCE[jnp.float32]
    few = make_case(13, [1, 1, 1], [300, 5, 1100], 8, 2, 64, jnp.float32, page_size=8, padding_tokens=0)
    np.testing.assert_array_equal(_table(few)[:14, MERGE_COUNT], [3, 3, 3, 1] + [9] * 9 + [0])
    assert relative_error(_run(few), few.want) < TOLERANCE[jnp.float32]


@pytest.mark.parametrize("dtype, dim, keys", [(jnp.bfloat16, 128, 128), (jnp.float32, 64, 128),
                                               (jnp.float32, 128, 64)])
def test_chunks_across_key_blocks(dtype, dim, keys):
    # A 150-token chunk whose context (300) starts mid-block, and one of 70 from position 0:
    # 128-key blocks are 16 pages of 8 here, 64-key blocks 8 pages.
    case = make_case(14, [150, 1, 70], [300, 260, 70], 8, 2, dim, dtype, page_size=8)
    assert _plan(case).block_keys == keys
    assert relative_error(_run(case), case.want) < TOLERANCE[dtype]


@pytest.mark.parametrize("window, soft_cap", [(5, None), (None, 30.0), (20, 20.0)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_window_and_soft_cap(window, soft_cap, dtype):
    # The 400-token decode splits into entries the window leaves empty.
    case = make_case(3, [1, 70, 2, 1], [100, 70, 16, 400], 8, 2, 64, dtype, page_size=8, window=window,
                     soft_cap=soft_cap)
    out = _run(case, sliding_window=window, soft_cap=soft_cap)
    assert relative_error(out, case.want) < TOLERANCE[dtype]


def test_a_host_table_gives_the_same_rows_as_the_kernels_own():
    case = make_case(4, [1, 40, 0, 1], [300, 50, 0, 9], 8, 2, 64, jnp.bfloat16, page_size=16)
    own = _run(case)
    np.testing.assert_array_equal(_run(case, work=jnp.asarray(_table(case))), own)
    with pytest.raises(ValueError, match=r"work table of shape \(3, 8\); these shapes need \(72, 8\)"):
        _run(case, work=jnp.zeros((3, 8), jnp.int32))


def test_fresh_inputs_on_every_seed_match_the_reference():
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        q_lens = [int(x) for x in rng.integers(0, 24, size=5)]
        ctx = [n + int(rng.integers(0, 60)) for n in q_lens]
        case = make_case(seed, q_lens, ctx, 8, 2, 64, jnp.float32, page_size=8)
        ref = ragged_paged_attention_ref(*case.arrays, sm_scale=case.sm_scale)
        assert relative_error(_run(case), np.asarray(ref)) < 1e-5


@pytest.mark.parametrize(
    "heads, kv_heads, dim, page, dtype, message",
    [
        (32, 2, 128, 16, jnp.bfloat16, "at most 8"),
        (8, 2, 96, 16, jnp.bfloat16, "head_dim=96"),
        (8, 2, 64, 12, jnp.bfloat16, "page size 12"),
        (8, 2, 64, 16, jnp.float16, "float16"),
    ],
)
def test_unsupported_shapes_are_refused_by_name(heads, kv_heads, dim, page, dtype, message):
    with pytest.raises(UnsupportedAttentionShape, match=message):
        check_supported(heads, kv_heads, dim, page, dtype)


def _export_for_cuda(tokens, seqs, dtype, with_table, **kwargs):
    shapes = [((tokens, 32, 128), dtype), ((256, 16, 8, 128), dtype), ((256, 16, 8, 128), dtype),
              ((seqs, 64), jnp.int32), ((seqs,), jnp.int32), ((seqs + 1,), jnp.int32)]
    if with_table:
        shapes.append(((plan_for(tokens, seqs, 32, 8, 128, 16, dtype, kwargs.get("decode_only", False)).rows, 8),
                       jnp.int32))
    fn = jax.jit(functools.partial(ragged_paged_attention, sm_scale=0.1, sliding_window=64, soft_cap=30.0, **kwargs))
    exported = jax.export.export(
        fn, platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    )(*[jax.ShapeDtypeStruct(s, d) for s, d in shapes])
    return exported.mlir_module()


@pytest.mark.parametrize("tokens, seqs, dtype, kwargs, names", [
    (1, 1, jnp.bfloat16, {}, ("decode_g4_d128_k128", "chunks_g4_d128_k128_c0")),
    (64, 64, jnp.bfloat16, {}, ("decode_g4_d128_k128", "chunks_g4_d128_k128_c37")),
    (64, 64, jnp.bfloat16, {"decode_only": True}, ("decode_g4_d128_k128", "chunks_g4_d128_k128_c0")),
    (512, 16, jnp.float32, {}, ("decode_g4_d128_k64", "chunks_g4_d128_k64_c49")),
])
def test_lowers_to_triton_for_cuda_with_no_glue_around_it(tokens, seqs, dtype, kwargs, names):
    # Lowering builds the Triton IR here; only compiling it to PTX needs the GPU. With the
    # step's table passed in, attention is two kernels between two free reshapes: no
    # transpose, padding, gather or merge in XLA.
    text = _export_for_cuda(tokens, seqs, dtype, with_table=True, **kwargs)
    assert re.findall(r"ragged_paged_attention_(\w+?)\"", text) == [*names]
    ops = sorted(set(re.findall(r"= (stablehlo\.\w+)", text)))
    assert ops == ["stablehlo.custom_call", "stablehlo.reshape"]
    assert text.count("__gpu$xla.gpu.triton") == 2
    # Without a table the kernel builds its own in XLA (standalone use), still no gather of rows.
    assert "stablehlo.transpose" not in _export_for_cuda(tokens, seqs, dtype, with_table=False, **kwargs)
