"""The gathered LoRA kernels, run in interpret mode on CPU, against the XLA product
(`models/lora.lora_delta`, which the engine runs on CPU and which matches peft); and their
Triton lowering for CUDA, which runs here too (only compiling it needs a GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.lora_bgmv import UnsupportedLoraShape, check_supported, lora_bgmv
from models.lora import lora_delta

TOLERANCE = {jnp.float32: 1e-6, jnp.bfloat16: 2e-2}


def _case(seed, tokens, fan_in, fan_out, rank, num_slots=4, layers=3, dtype=jnp.float32, slots=None):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((layers, num_slots, fan_in, rank)).astype(np.float32)
    b = rng.standard_normal((layers, num_slots, rank, fan_out)).astype(np.float32)
    a[:, 0], b[:, 0] = 0, 0  # slot 0 is "no adapter", as the server keeps it
    x = rng.standard_normal((tokens, fan_in)).astype(np.float32)
    if slots is None:
        slots = rng.integers(0, num_slots, tokens)
    return (jnp.asarray(x, dtype), jnp.asarray(a, dtype), jnp.asarray(b, dtype), jnp.asarray(slots, jnp.int32))


def _want(x, a, b, slots, layer):
    """The XLA product in float32, from the same (possibly bfloat16-rounded) inputs."""
    f32 = lambda v: v.astype(jnp.float32)  # noqa: E731
    return np.asarray(lora_delta(f32(x), f32(a[layer]), f32(b[layer]), jax.nn.one_hot(slots, a.shape[1])))


def _error(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("block_tokens, rank", [(1, 8), (1, 16), (16, 16), (16, 64)], ids=["bgmv-r8", "bgmv-r16",
                                                                                           "sgmv-r16", "sgmv-r64"])
@pytest.mark.parametrize("k_splits", [1, 3, None])
def test_every_token_gets_its_own_slots_product(dtype, block_tokens, rank, k_splits):
    # 37 tokens (not a whole number of 16-token blocks) over slots 0-3; widths 576 and 96 are
    # multiples of 16 but not powers of two (blocks of 64 and 32).
    x, a, b, slots = _case(1, 37, 576, 96, rank, dtype=dtype)
    got = lora_bgmv(x, a, b, slots, 2, interpret=True, block_tokens=block_tokens, k_splits=k_splits)
    assert got.shape == (37, 96) and got.dtype == dtype
    assert _error(got, _want(x, a, b, slots, 2)) < TOLERANCE[dtype]


@pytest.mark.parametrize("block_tokens", [1, 16])
def test_base_tokens_get_exact_zeros_and_segments_match(block_tokens):
    # Prefill-like runs of one adapter (segments), a run of base tokens between them.
    slots = [2] * 20 + [0] * 7 + [1] * 18 + [3] + [0] * 2
    x, a, b, slots = _case(2, len(slots), 64, 128, 16, slots=slots)
    got = np.asarray(lora_bgmv(x, a, b, slots, 0, interpret=True, block_tokens=block_tokens))
    assert np.all(got[20:27] == 0) and np.all(got[-2:] == 0)
    assert _error(got, _want(x, a, b, slots, 0)) < 1e-6


def test_the_layer_is_a_runtime_operand():
    # Traced layer index: one compiled kernel serves every layer.
    x, a, b, slots = _case(3, 5, 32, 48, 8)
    fn = jax.jit(lambda layer: lora_bgmv(x, a, b, slots, layer, interpret=True))
    for layer in range(3):
        assert _error(fn(jnp.int32(layer)), _want(x, a, b, slots, layer)) < 1e-6
    assert fn._cache_size() == 1


@pytest.mark.parametrize("fan_in, fan_out, rank, dtype, message", [
    (72, 64, 16, jnp.float32, "input width 72 is not a multiple of 16"),
    (64, 100, 16, jnp.float32, "output width 100"),
    (64, 64, 24, jnp.float32, "rank 24 is not a power of two"),
    (64, 64, 16, jnp.float16, "float16"),
])
def test_shapes_the_kernels_cannot_take_are_refused_by_name(fan_in, fan_out, rank, dtype, message):
    with pytest.raises(UnsupportedLoraShape, match=message):
        check_supported(fan_in, fan_out, rank, dtype)


def test_sgmv_needs_rank_16():
    x, a, b, slots = _case(5, 32, 64, 64, 8)
    with pytest.raises(UnsupportedLoraShape, match="ranks >= 16"):
        lora_bgmv(x, a, b, slots, 0, interpret=True, block_tokens=16)


@pytest.mark.parametrize("tokens, rank, dtype, mode", [
    (8, 16, jnp.bfloat16, "bgmv"), (512, 16, jnp.bfloat16, "sgmv"), (512, 64, jnp.float32, "sgmv"),
    (4, 8, jnp.float32, "bgmv"),
])
def test_lowers_to_triton_for_cuda(tokens, rank, dtype, mode):
    # Llama-3.1-8B's down_proj widths, 4 adapters; the default choice of BGMV (decode-sized
    # batches, ranks below 16) or SGMV (the rest) shows in the kernels' names. Lowering builds the Triton IR here, only
    # compiling it to PTX needs the GPU (perf/gpu_kernel_check.py does that).
    shapes = [((tokens, 14336), dtype), ((32, 5, 14336, rank), dtype), ((32, 5, rank, 4096), dtype),
              ((tokens,), jnp.int32)]
    fn = jax.jit(lambda x, a, b, s: lora_bgmv(x, a, b, s, 7))
    exported = jax.export.export(
        fn, platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    )(*[jax.ShapeDtypeStruct(s, d) for s, d in shapes])
    text = exported.mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 2
    assert f"lora_{mode}_shrink_r{rank}" in text and f"lora_{mode}_expand_r{rank}" in text
