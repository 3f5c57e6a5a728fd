"""The Pallas kernel, run in interpret mode on CPU, against plain dense attention; and its
Triton lowering for CUDA, which runs on this CPU machine too (only compiling it needs a GPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.ragged_paged_attention import UnsupportedAttentionShape, check_supported, ragged_paged_attention
from tests.kernels.attention_cases import make_case, relative_error

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _run(case, **kwargs):
    # Output slabs start as NaN: a row some program failed to write would poison the result.
    out = ragged_paged_attention(*case.arrays, sm_scale=case.sm_scale, interpret=True, poison=float("nan"), **kwargs)
    out = np.asarray(out.astype(jnp.float32))
    assert not np.isnan(out).any()
    return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 4, 64), (8, 4, 128), (12, 3, 64), (16, 2, 128), (6, 2, 128)])
def test_ragged_batch_matches_dense(heads, kv_heads, dim, dtype):
    # Decodes, a chunk crossing pages in mid-context, an empty slot, a whole prefill, and
    # trailing padding tokens; page size 8, so 64-key steps span 8 pages.
    case = make_case(heads * dim, [1, 1, 19, 0, 33, 1], [40, 9, 27, 0, 33, 130], heads, kv_heads, dim, dtype,
                     page_size=8)
    out = _run(case)
    assert relative_error(out, case.want) < TOLERANCE[dtype]
    assert np.all(out[sum([1, 1, 19, 0, 33, 1]):] == 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_only_batch_uses_small_programs(dtype):
    # tokens <= seqs selects 16-row programs; an empty slot sits between decodes.
    case = make_case(7, [1, 1, 0, 1], [70, 1, 0, 16], 8, 1, 128, dtype, page_size=16, padding_tokens=0)
    assert relative_error(_run(case), case.want) < TOLERANCE[dtype]


@pytest.mark.parametrize("kv_splits", [1, 3, 16])
def test_split_contexts_merge_to_the_same_answer(kv_splits):
    # Decodes over 300-token contexts split into key ranges (some empty with 16 splits).
    case = make_case(11, [1, 1, 1], [300, 5, 129], 8, 2, 64, jnp.float32, page_size=8, padding_tokens=0)
    assert relative_error(_run(case, kv_splits=kv_splits), case.want) < 1e-5


@pytest.mark.parametrize("window, soft_cap", [(5, None), (None, 30.0), (20, 20.0)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_window_and_soft_cap(window, soft_cap, dtype):
    case = make_case(3, [1, 70, 2], [100, 70, 16], 8, 2, 64, dtype, page_size=8, window=window, soft_cap=soft_cap)
    out = _run(case, sliding_window=window, soft_cap=soft_cap)
    assert relative_error(out, case.want) < TOLERANCE[dtype]


def test_fresh_inputs_on_every_seed_match_the_reference():
    from kernels.ragged_paged_attention_ref import ragged_paged_attention_ref

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


@pytest.mark.parametrize("tokens, seqs", [(16, 16), (512, 16)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_triton_for_cuda(tokens, seqs, dtype):
    # Lowering builds the Triton IR here; only compiling it to PTX needs the GPU
    # (perf/gpu_check.sh does that).
    shapes = [((tokens, 32, 128), dtype), ((256, 16, 8, 128), dtype), ((256, 16, 8, 128), dtype),
              ((seqs, 64), jnp.int32), ((seqs,), jnp.int32), ((seqs + 1,), jnp.int32)]
    fn = jax.jit(functools.partial(ragged_paged_attention, sm_scale=0.1, sliding_window=64, soft_cap=30.0))
    exported = jax.export.export(
        fn, platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    )(*[jax.ShapeDtypeStruct(s, d) for s, d in shapes])
    text = exported.mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 1
    name = "ragged_paged_attention_r16_g4_d128_s2" if tokens <= seqs else "ragged_paged_attention_r64_g4_d128_s1"
    assert name in text
