"""The CPU logits summary (top k with ids, log-sum-exp) against lax.top_k and logsumexp, and
sampling on it against sampling on XLA's operations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.logits_summary_cpu import logits_summary_cpu
from runtime.sampling import SamplingInputs, sample_tokens

summary = jax.jit(logits_summary_cpu, static_argnums=1)


@pytest.mark.parametrize("rows, vocab, k", [(1, 49152, 20), (16, 49152, 20), (3, 20, 20), (5, 1000, 1), (2, 4099, 64)])
def test_matches_top_k_and_logsumexp(rows, vocab, k):
    logits = jnp.asarray(np.random.default_rng(vocab + rows).standard_normal((rows, vocab)) * 4, jnp.float32)
    values, ids, lse = summary(logits, k)
    want_values, want_ids = jax.lax.top_k(logits, k)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
    np.testing.assert_array_equal(np.asarray(values), np.asarray(want_values))
    np.testing.assert_allclose(np.asarray(lse), np.asarray(jax.nn.logsumexp(logits, axis=-1)), rtol=1e-6)


def test_ties_rank_the_lower_id_first_and_masked_rows_stay_finite_elsewhere():
    logits = np.full((3, 50), -3.0, np.float32)
    logits[0, [7, 3, 40]] = 5.0  # three equal maxima
    logits[1, :] = -np.inf  # nothing can be drawn
    logits[2, 10:] = -np.inf  # ten tokens left
    values, ids, lse = summary(jnp.asarray(logits), 4)
    assert np.asarray(ids)[0].tolist() == [3, 7, 40, 0]
    assert np.asarray(values)[0].tolist() == [5.0, 5.0, 5.0, -3.0]
    assert np.asarray(lse)[1] == -np.inf
    assert np.asarray(ids)[2].tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(np.asarray(lse)[[0, 2]], [5 + np.log(3 + 47 * np.exp(-8.0)), -3 + np.log(10)], rtol=1e-6)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="k must be in"):
        logits_summary_cpu(jnp.zeros((2, 10)), 11)
    with pytest.raises(ValueError, match="float32 matrix"):
        logits_summary_cpu(jnp.zeros((2, 10), jnp.bfloat16), 2)


def test_sampling_on_the_summary_matches_sampling_on_xla():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((6, 3000)) * 3, jnp.float32)
    inputs = SamplingInputs(
        temperature=np.asarray([0, 0.7, 1.0, 0, 1.3, 0.5], np.float32), top_p=np.asarray([1, 0.9, 1, 1, 0.5, 1], np.float32),
        top_k=np.asarray([0, 0, 40, 0, 0, 5], np.int32), min_p=np.zeros(6, np.float32),
        seeds=np.arange(6, dtype=np.uint32), positions=np.arange(6, dtype=np.int32) + 10,
    )
    on_cpu = jax.jit(lambda lg, s: sample_tokens(lg, s, None, "cpu"))(logits, inputs)
    on_xla = jax.jit(lambda lg, s: sample_tokens(lg, s, None, "xla"))(logits, inputs)
    np.testing.assert_array_equal(np.asarray(on_cpu.tokens), np.asarray(on_xla.tokens))
    np.testing.assert_array_equal(np.asarray(on_cpu.top_ids), np.asarray(on_xla.top_ids))
    np.testing.assert_allclose(np.asarray(on_cpu.logprobs), np.asarray(on_xla.logprobs), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(on_cpu.top_logprobs), np.asarray(on_xla.top_logprobs), rtol=1e-5, atol=1e-5)
    want_greedy = np.asarray(jnp.argmax(logits, axis=-1))
    assert np.asarray(on_cpu.tokens)[[0, 3]].tolist() == want_greedy[[0, 3]].tolist()
    log_softmax = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    np.testing.assert_allclose(np.asarray(on_cpu.logprobs), log_softmax[np.arange(6), np.asarray(on_cpu.tokens)], rtol=1e-5)
