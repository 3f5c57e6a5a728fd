"""On-device sampling: greedy, temperature, top-k, top-p, min-p, penalties, logprobs, seeded keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runtime.sampling import LogitAdjustments, SamplingInputs
from runtime.sampling import sample_tokens as _sample_tokens

sample_tokens = jax.jit(_sample_tokens)  # as the runner calls it: inside one compiled step

PROBS = [0.5, 0.3, 0.15, 0.05]
LOGITS = jnp.log(jnp.asarray([PROBS], jnp.float32))


def _inputs(rows, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=0, position=0):
    full = lambda v, dt: jnp.full((rows,), v, dt)  # noqa: E731
    positions = jnp.asarray(position, jnp.int32) if np.ndim(position) else full(position, jnp.int32)
    return SamplingInputs(
        full(temperature, jnp.float32), full(top_p, jnp.float32), full(top_k, jnp.int32),
        full(min_p, jnp.float32), full(seed, jnp.uint32), positions,
    )


def _draws(count=300, **kw):
    """`count` draws from PROBS by one request at positions 0..count-1, in one batch."""
    logits = jnp.broadcast_to(LOGITS, (count, 4))
    return sample_tokens(logits, _inputs(count, position=np.arange(count), **kw)).tokens.tolist()


def test_temperature_zero_is_argmax():
    logits = jnp.asarray([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]], jnp.float32)
    assert sample_tokens(logits, _inputs(2, temperature=0.0)).tokens.tolist() == [1, 0]


def test_top_p_keeps_the_smallest_nucleus():
    assert set(_draws(top_p=0.8)) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert set(_draws(50, top_p=0.01)) == {0}


def test_top_k_and_min_p():
    assert set(_draws(top_k=3)) == {0, 1, 2}
    assert set(_draws(top_k=1)) == {0}
    # min_p 0.35: tokens below 0.35 * 0.5 = 0.175 are dropped.
    assert set(_draws(min_p=0.35)) == {0, 1}


def test_full_distribution_frequencies():
    counts = np.bincount(_draws(2000, seed=3), minlength=4) / 2000
    np.testing.assert_allclose(counts, PROBS, atol=0.04)


def test_same_seed_and_position_same_token_whatever_the_batch():
    alone = _draws(1, seed=11)
    batch = SamplingInputs(
        jnp.ones(3, jnp.float32), jnp.ones(3, jnp.float32), jnp.zeros(3, jnp.int32), jnp.zeros(3, jnp.float32),
        jnp.asarray([99, 11, 4], jnp.uint32), jnp.asarray([0, 0, 9], jnp.int32),
    )
    assert int(sample_tokens(jnp.concatenate([LOGITS] * 3), batch).tokens[1]) == alone[0]
    assert _draws(30, seed=1) == _draws(30, seed=1) != _draws(30, seed=2)


def test_logprobs_are_of_the_raw_distribution():
    out = sample_tokens(LOGITS, _inputs(1, temperature=0.0))
    np.testing.assert_allclose(float(out.logprobs[0]), np.log(0.5), rtol=1e-6)
    assert out.top_ids[0, :4].tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(np.asarray(out.top_logprobs[0, :4]), np.log(PROBS), rtol=1e-6)


def _adjust(counts, seen, banned=None, presence=0.0, frequency=0.0, repetition=1.0, allowed=-1):
    v = len(counts)
    return LogitAdjustments(
        jnp.asarray([counts], jnp.int32), jnp.asarray([seen], bool),
        jnp.asarray([banned or [False] * v], bool),
        jnp.asarray([presence], jnp.float32), jnp.asarray([frequency], jnp.float32), jnp.asarray([repetition], jnp.float32),
        jnp.full((1, (v + 31) // 32), allowed, jnp.int32),
    )


def test_a_grammar_mask_leaves_only_its_tokens():
    # Bits 2 and 3 set: only tokens 2 and 3 may be drawn, greedy picks the likelier of them.
    out = sample_tokens(LOGITS, _inputs(1, temperature=0.0), _adjust([0] * 4, [0] * 4, allowed=0b1100))
    assert int(out.tokens[0]) == 2
    drawn = {int(sample_tokens(LOGITS, _inputs(1, temperature=1.0, seed=s), _adjust([0] * 4, [0] * 4,
                                                                                     allowed=0b1010)).tokens[0])
             for s in range(20)}
    assert drawn == {1, 3}


@pytest.mark.parametrize(
    "adjust, expected_token",
    [
        (dict(counts=[3, 0, 0, 0], seen=[1, 0, 0, 0], frequency=0.2), 1),  # 2.0 - 0.6 = 1.4 < 1.5
        (dict(counts=[1, 0, 0, 0], seen=[1, 0, 0, 0], presence=0.6), 1),  # 2.0 - 0.6 = 1.4 < 1.5
        (dict(counts=[1, 0, 0, 0], seen=[1, 0, 0, 0], presence=0.4), 0),  # 2.0 - 0.4 = 1.6 > 1.5
        (dict(counts=[0, 0, 0, 0], seen=[1, 0, 0, 0], repetition=1.5), 1),  # 2.0 / 1.5 = 1.33 < 1.5
        (dict(counts=[0, 0, 0, 0], seen=[0, 0, 0, 0], banned=[True, False, False, False]), 1),
    ],
)
def test_penalties_change_the_greedy_choice(adjust, expected_token):
    logits = jnp.asarray([[2.0, 1.5, -1.0, 0.5]], jnp.float32)
    out = sample_tokens(logits, _inputs(1, temperature=0.0), _adjust(**adjust))
    assert int(out.tokens[0]) == expected_token


def test_repetition_penalty_multiplies_negative_logits():
    logits = jnp.asarray([[-1.0, -1.2, -3.0, -3.0]], jnp.float32)
    out = sample_tokens(logits, _inputs(1, temperature=0.0), _adjust([0] * 4, [1, 0, 0, 0], repetition=1.5))
    assert int(out.tokens[0]) == 1  # -1.0 * 1.5 = -1.5 < -1.2
