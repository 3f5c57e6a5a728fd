"""The causal forward without a KV cache (training, scoring) computes what transformers and
the paged serving path compute, and gradients flow through it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from models.forward import sequence_logits
from models.loader import load_model
from tests.helpers.paged_run import tessera_logits
from tests.helpers.tiny_checkpoint import ARCHITECTURES, load_reference

ROWS = [
    [5, 77, 300, 12, 9, 411, 250, 33, 71, 2, 199, 64, 480, 7, 15, 128, 91, 3, 44, 310],
    [17, 4, 260, 99, 301, 8, 1, 444, 56, 230, 11, 6, 370, 402, 19, 27, 88, 140, 500, 63],
]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_sequence_logits_match_transformers(checkpoint, arch):
    # mistral's window (12) is shorter than the rows, so the windowed mask is exercised too.
    folder = checkpoint(arch)
    model = load_model(folder)
    got = np.asarray(sequence_logits(model.graphdef, model.state, jnp.asarray(ROWS, jnp.int32)))
    with torch.no_grad():
        want = load_reference(folder)(torch.tensor(ROWS)).logits.numpy()
    assert got.shape == (2, 20, 520)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_sequence_logits_equal_the_paged_prefill(checkpoint):
    model = load_model(checkpoint("llama"))
    got = np.asarray(sequence_logits(model.graphdef, model.state, jnp.asarray(ROWS[:1], jnp.int32)))[0]
    np.testing.assert_allclose(got, tessera_logits(model, ROWS[0], [])[0], atol=1e-5, rtol=0)


def test_gradients_reach_every_parameter(checkpoint):
    model = load_model(checkpoint("qwen3"))
    batch = jnp.asarray(ROWS, jnp.int32)

    def loss(state):
        return sequence_logits(model.graphdef, state, batch).mean()

    grads = jax.grad(loss)(model.state)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert len(norms) == len(jax.tree.leaves(model.state))
    assert all(np.isfinite(n) and n > 0 for n in norms)
