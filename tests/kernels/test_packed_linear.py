"""The packed bfloat16 product kernel against numpy, on whichever paths this CPU runs (AMX
tiles, AVX-512 BF16, widening): row counts on both sides of the decode/prompt split and off
the 16-row tile and the kernels' row blocks, K padded to 32, full and tail column blocks,
float32 and bfloat16 activations. tests/kernels/test_cpu_targets.py runs the same products
with the library built for each lower x86-64 level this CPU can run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.packed_linear import pack_weight, packed_linear


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16, 17, 100, 131])
@pytest.mark.parametrize("k, n", [(576, 960), (40, 48), (1536, 576), (64, 16), (33, 3072), (96, 80)])
@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_products_match_numpy(rows, k, n, x_dtype):
    rng = np.random.default_rng(rows * 7 + k + n)
    x = jnp.asarray(rng.standard_normal((rows, k)), x_dtype)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
    as_f32 = lambda a: np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32))  # noqa: E731
    want = as_f32(x) @ as_f32(w)
    got = jax.jit(packed_linear)(x, pack_weight(w))
    assert got.dtype == x_dtype and got.shape == (rows, n)
    tol = 1e-5 if x_dtype == jnp.float32 else 1e-2  # float32 sums in another order; bfloat16 rounds
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)) / scale, want / scale, atol=tol)


@pytest.mark.parametrize("rows", [1, 3, 16, 40])
@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_gated_product_applies_silu_to_the_gate_half(rows, x_dtype):
    k, n = 1536, 576  # a down projection: x holds the gate and up projections side by side
    rng = np.random.default_rng(rows)
    gate_up = jnp.asarray(rng.standard_normal((rows, 2 * k)) * 3, x_dtype)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
    g, u = np.split(np.asarray(gate_up.astype(jnp.float32)), 2, axis=1)
    h = np.asarray(jnp.asarray(g / (1 + np.exp(-g)) * u).astype(jnp.bfloat16).astype(jnp.float32))
    want = h @ np.asarray(w.astype(jnp.float32))
    got = np.asarray(jax.jit(lambda a, b: packed_linear(a, b, gated=True))(gate_up, pack_weight(w)).astype(jnp.float32))
    scale = np.abs(want).max()
    # An activation a float32 ulp away from numpy's can round to the neighbouring bfloat16.
    np.testing.assert_allclose(got / scale, want / scale, atol=2e-4 if x_dtype == jnp.float32 else 1e-2)


def test_packing_layout_and_refusals():
    w = jnp.arange(6 * 48, dtype=jnp.float32).reshape(6, 48)  # one block of 32 columns, a tail of 16
    packed = np.asarray(pack_weight(w).astype(jnp.float32))
    assert packed.shape == (16, 96)  # K 6 -> 32 rows, in pairs
    block = packed.reshape(-1)[: 16 * 64].reshape(16, 32, 2)  # [K / 2, columns, pair]
    np.testing.assert_array_equal(block[1, :2], [[96, 144], [97, 145]])  # (w[2, n], w[3, n]) for n = 0, 1
    assert np.all(block[3:] == 0)
    tail = packed.reshape(-1)[16 * 64 :].reshape(16, 16, 2)
    np.testing.assert_array_equal(tail[0, 0], [32, 80])  # (w[0, 32], w[1, 32])
    np.testing.assert_array_equal(tail[1, 15], [2 * 48 + 47, 3 * 48 + 47])  # (w[2, 47], w[3, 47])
    assert np.all(tail[3:] == 0)
    with pytest.raises(ValueError, match="N a multiple of 16"):
        pack_weight(jnp.ones((8, 10)))
    with pytest.raises(ValueError, match="x has 40 columns but the packed weight holds K up to 32"):
        packed_linear(jnp.ones((2, 40)), pack_weight(jnp.ones((30, 16))))
    with pytest.raises(ValueError, match="an even width, got 41"):
        packed_linear(jnp.ones((2, 41)), pack_weight(jnp.ones((20, 16))), gated=True)
    with pytest.raises(ValueError, match="x has 40 gate columns"):
        packed_linear(jnp.ones((2, 80)), pack_weight(jnp.ones((30, 16))), gated=True)
