"""The C++ CPU product kernel against numpy, for every path: rows split by K (up to 4) or by
columns (more), column tails that are not multiples of 16, [N, K] weights, both dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.linear_cpu import linear_cpu


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16, 64])
@pytest.mark.parametrize("k, n", [(576, 960), (1536, 576), (576, 50), (40, 3072), (7, 33)])
@pytest.mark.parametrize("w_dtype, x_dtype", [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32),
                                              (jnp.bfloat16, jnp.bfloat16)])
def test_products_match_numpy(rows, k, n, w_dtype, x_dtype):
    rng = np.random.default_rng(rows * 1000 + k + n)
    x = jnp.asarray(rng.standard_normal((rows, k)), x_dtype)
    w = jnp.asarray(rng.standard_normal((k, n)), w_dtype)
    want = np.asarray(x.astype(jnp.float32)) @ np.asarray(w.astype(jnp.float32))
    got = jax.jit(linear_cpu)(x, w)
    got_t = jax.jit(lambda x, w: linear_cpu(x, w, transposed=True))(x, w.T)
    assert got.dtype == x_dtype and got.shape == (rows, n)
    # float32 products sum in another order than numpy; a bfloat16 result is rounded to 8 bits.
    tol = 1e-5 if x_dtype == jnp.float32 else 1e-2
    scale = np.abs(want).max()
    for result in (got, got_t):
        np.testing.assert_allclose(np.asarray(result.astype(jnp.float32)) / scale, want / scale, atol=tol)


def test_mismatched_shapes_and_dtypes_are_refused():
    x = jnp.ones((2, 8))
    with pytest.raises(ValueError, match="x has 8 columns but w has 9 input features"):
        linear_cpu(x, jnp.ones((9, 4)))
    with pytest.raises(ValueError, match="w must be a float32 or bfloat16 matrix"):
        linear_cpu(x, jnp.ones((8, 4, 1)))
