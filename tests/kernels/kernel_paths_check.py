"""Every CPU kernel once against numpy, as a script: `python -m tests.kernels.kernel_paths_check`
prints one JSON object of errors (relative to each answer's largest value) and the paths the
library took. test_cpu_targets.py runs it in a fresh process with the library built for an
x86-64 level below this CPU's own, so the narrower vector paths run on machines that would
otherwise always take the widest."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from kernels.cpu_library import available
from kernels.linear_cpu import linear_cpu
from kernels.logits_summary_cpu import logits_summary_cpu
from kernels.packed_linear import cpu_paths, pack_weight, packed_linear
from kernels.ragged_paged_attention_cpu import ragged_paged_attention_cpu

from tests.kernels.attention_cases import make_case

PACKED_ROWS = (1, 3, 4, 5, 16, 37)
PACKED_SHAPES = ((576, 960), (1536, 576), (40, 48))


def _f32(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(jnp.float32))


def _error(got, want) -> float:
    return float(np.abs(_f32(got) - want).max() / np.abs(want).max())


def packed_errors() -> dict[str, float]:
    out = {}
    for rows in PACKED_ROWS:
        for k, n in PACKED_SHAPES:
            rng = np.random.default_rng(rows + k + n)
            x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
            w = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
            want = _f32(x.astype(jnp.bfloat16)) @ _f32(w)
            out[f"packed {rows}x{k}x{n}"] = _error(jax.jit(packed_linear)(x, pack_weight(w)), want)
            gated = jnp.concatenate([x, x], axis=1)  # silu(x) * x
            h = _f32(jnp.asarray(_f32(x) / (1 + np.exp(-_f32(x))) * _f32(x)).astype(jnp.bfloat16))
            got = jax.jit(lambda a, b: packed_linear(a, b, gated=True))(gated, pack_weight(w))
            out[f"packed gated {rows}x{k}x{n}"] = _error(got, h @ _f32(w))
    return out


def linear_errors() -> dict[str, float]:
    out = {}
    for rows in (1, 4, 9):
        rng = np.random.default_rng(rows)
        x = jnp.asarray(rng.standard_normal((rows, 576)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((576, 200)), jnp.float32)
        want = _f32(x) @ _f32(w)
        out[f"linear kn {rows}"] = _error(jax.jit(linear_cpu)(x, w), want)
        out[f"linear nk {rows}"] = _error(jax.jit(lambda a, b: linear_cpu(a, b, transposed=True))(x, w.T), want)
    return out


def attention_errors() -> dict[str, float]:
    out = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        case = make_case(7, [1, 40, 0, 9], [300, 50, 0, 9], 8, 2, 64, dtype, page_size=16)
        got = jax.jit(lambda *a: ragged_paged_attention_cpu(*a, sm_scale=case.sm_scale))(*case.arrays)
        out[f"attention {jnp.dtype(dtype).name}"] = _error(got[:50], case.want[:50])
    return out


def logits_errors() -> dict[str, float]:
    logits = jnp.asarray(np.random.default_rng(3).standard_normal((3, 1000)) * 4, jnp.float32)
    values, ids, lse = jax.jit(lambda a: logits_summary_cpu(a, 5))(logits)
    want_ids = np.argsort(-_f32(logits), axis=1, kind="stable")[:, :5]
    want_lse = np.log(np.exp(_f32(logits)).sum(axis=1))
    return {
        "logits ids": float(np.any(np.asarray(ids) != want_ids)),
        "logits values": _error(values, np.take_along_axis(_f32(logits), want_ids, axis=1)),
        "logits lse": _error(lse, want_lse),
    }


def main() -> None:
    if not available():
        raise SystemExit("the kernel library did not build")
    errors = {**packed_errors(), **linear_errors(), **attention_errors(), **logits_errors()}
    print(json.dumps({"paths": cpu_paths(), "errors": errors}))


if __name__ == "__main__":
    main()
