"""Small-batch projections in the CPU kernel compute what XLA's products do."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.forward import sequence_logits
from models.fusion import fuse_projections
from models.linear import use_cpu_linear
from models.loader import load_model

from tests.helpers.tiny_checkpoint import build_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # A vocabulary of 520, not a multiple of 16, so the
    # weights cannot be packed and the small-batch kernel serves.
    return build_checkpoint(tmp_path_factory.mktemp("lin"), "llama")


@pytest.fixture(scope="module")
def packable_checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("packed"), "llama", vocab_size=512)


@pytest.mark.parametrize("which, impl", [("checkpoint", "cpu"), ("packable_checkpoint", "packed")])
def test_bfloat16_logits_follow_the_float32_model(which, impl, request):
    checkpoint = request.getfixturevalue(which)
    reference = load_model(checkpoint, "float32")
    served = use_cpu_linear(fuse_projections(load_model(checkpoint, "bfloat16")))
    module = nnx.merge(served.graphdef, served.state)
    assert module.linear_impl == impl and module.layers[0].mlp.linear_impl == impl
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, reference.cfg.vocab_size, (1, 12)), jnp.int32)
    want = np.asarray(sequence_logits(reference.graphdef, reference.state, tokens))
    got = np.asarray(sequence_logits(served.graphdef, served.state, tokens))
    plain = load_model(checkpoint, "bfloat16")
    xla = np.asarray(sequence_logits(plain.graphdef, plain.state, tokens))
    # bfloat16 weights and activations: both paths sit within bfloat16 rounding of float32.
    scale = np.abs(want).max()
    assert np.abs(got - want).max() / scale < 0.03
    assert np.abs(got - xla).max() / scale < 0.03


def test_switched_off_by_the_environment(checkpoint, monkeypatch):
    monkeypatch.setenv("TESSERA_CPU_LINEAR", "0")
    model = load_model(checkpoint, "bfloat16")
    assert use_cpu_linear(model) is model


def test_float32_kernels_match_xla_with_the_tied_head_laid_out_for_them(tmp_path):
    # The kernels' float32 path: q/k/v with rotary embeddings in one call, the tied head as a
    # [K, N] copy. Decode-sized (12 rows) and prompt-sized (80 rows, XLA's products) alike.
    checkpoint = build_checkpoint(tmp_path, "llama", tie_word_embeddings=True)
    plain = load_model(checkpoint, "float32")
    served = use_cpu_linear(fuse_projections(load_model(checkpoint, "float32")))
    module = nnx.merge(served.graphdef, served.state)
    assert module.linear_impl == "cpu"
    np.testing.assert_array_equal(np.asarray(module.lm_head_kn[...]), np.asarray(module.embed_tokens[...]).T)
    for length in (12, 80):
        tokens = jnp.asarray(np.random.default_rng(length).integers(0, plain.cfg.vocab_size, (1, length)), jnp.int32)
        want = np.asarray(sequence_logits(plain.graphdef, plain.state, tokens))
        got = np.asarray(sequence_logits(served.graphdef, served.state, tokens))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
