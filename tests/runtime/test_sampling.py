"""On-device sampling: greedy, temperature, top-p and per-row seeded keys."""

import jax.numpy as jnp
import numpy as np

from runtime.sampling import sample

LOGITS = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))


def _draw(temperature, top_p, seed, position, logits=LOGITS):
    rows = logits.shape[0]
    out = sample(
        logits,
        jnp.full((rows,), temperature, jnp.float32),
        jnp.full((rows,), top_p, jnp.float32),
        jnp.full((rows,), seed, jnp.uint32),
        jnp.full((rows,), position, jnp.int32),
    )
    return np.asarray(out).tolist()


def test_temperature_zero_is_argmax():
    logits = jnp.asarray([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]], jnp.float32)
    assert _draw(0.0, 1.0, 0, 0, logits) == [1, 0]


def test_top_p_keeps_the_smallest_nucleus():
    # Mass 0.5 + 0.3 reaches 0.8: only tokens 0 and 1 may be drawn.
    drawn = {_draw(1.0, 0.8, 0, pos)[0] for pos in range(200)}
    assert drawn == {0, 1}
    # A tiny top_p keeps the single most likely token.
    assert {_draw(1.0, 0.01, 0, pos)[0] for pos in range(50)} == {0}


def test_full_distribution_frequencies():
    counts = np.bincount([_draw(1.0, 1.0, 3, pos)[0] for pos in range(2000)], minlength=4) / 2000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.04)


def test_same_seed_and_position_same_token_whatever_the_batch():
    alone = _draw(1.0, 1.0, 11, 5)[0]
    batch = sample(
        jnp.concatenate([LOGITS] * 3),
        jnp.ones(3, jnp.float32),
        jnp.ones(3, jnp.float32),
        jnp.asarray([99, 11, 4], jnp.uint32),
        jnp.asarray([0, 5, 9], jnp.int32),
    )
    assert int(batch[1]) == alone
    seqs = [[_draw(1.0, 1.0, seed, pos)[0] for pos in range(30)] for seed in (1, 1, 2)]
    assert seqs[0] == seqs[1] and seqs[0] != seqs[2]
