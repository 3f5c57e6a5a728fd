"""The fused q/k/v projection with rotary embeddings (both product kernels) against the
projection, split and `apply_rope` in XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.packed_linear import pack_weight
from kernels.qkv_rope_cpu import qkv_rope_cpu
from models.rope import apply_rope

HEADS, KV_HEADS, D, K = 9, 3, 64, 576


def _case(rows, dtype, seed=0):
    rng = np.random.default_rng(seed + rows)
    x = jnp.asarray(rng.standard_normal((rows, K)), dtype)
    w = jnp.asarray(rng.standard_normal((K, (HEADS + 2 * KV_HEADS) * D)) / 24, dtype)
    positions = jnp.asarray(rng.integers(0, 3000, rows), jnp.int32)
    inv_freq = jnp.asarray(1.0 / 10000 ** (np.arange(0, D, 2) / D), jnp.float32)
    return x, w, positions, inv_freq


def _want(x, w, positions, inv_freq):
    qkv = (x.astype(jnp.float32) @ w.astype(jnp.float32)).astype(x.dtype)
    q, k, v = jnp.split(qkv, [HEADS * D, (HEADS + KV_HEADS) * D], axis=1)
    q, k, v = (a.reshape(x.shape[0], -1, D) for a in (q, k, v))
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def _cos_sin(positions, inv_freq, dtype):
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(freqs).astype(dtype), jnp.sin(freqs).astype(dtype)


@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize("dtype, packed", [(jnp.float32, False), (jnp.bfloat16, False), (jnp.bfloat16, True)])
def test_matches_projection_split_and_rope(rows, dtype, packed):
    x, w, positions, inv_freq = _case(rows, dtype)
    cos, sin = _cos_sin(positions, inv_freq, dtype)
    fn = jax.jit(lambda a, b, c, s: qkv_rope_cpu(a, b, c, s, HEADS, KV_HEADS, packed=packed))
    got = fn(x, pack_weight(w) if packed else w, cos, sin)
    want = _want(x, w, positions, inv_freq)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2  # bfloat16: rounded once here, per step in XLA
    for name, g, e, heads in zip("qkv", got, want, (HEADS, KV_HEADS, KV_HEADS)):
        assert g.shape == (rows, heads, D) and g.dtype == dtype, name
        np.testing.assert_allclose(np.asarray(g.astype(jnp.float32)), np.asarray(e.astype(jnp.float32)), atol=tol, rtol=tol,
                                   err_msg=name)


def test_shapes_that_do_not_split_are_refused():
    x, w, positions, inv_freq = _case(2, jnp.float32)
    cos, sin = _cos_sin(positions, inv_freq, jnp.float32)
    with pytest.raises(ValueError, match="does not split into 8 \\+ 2 x 3 heads of 64"):
        qkv_rope_cpu(x, w, cos, sin, 8, KV_HEADS, packed=False)
    with pytest.raises(ValueError, match="float32 or bfloat16 matrix"):
        qkv_rope_cpu(x.astype(jnp.float16), w, cos, sin, HEADS, KV_HEADS, packed=False)
