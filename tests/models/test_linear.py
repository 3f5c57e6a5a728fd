"""Small-batch projections in the CPU kernel compute what XLA's products do."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels.amx_linear import amx_ready
from models.forward import sequence_logits
from models.fusion import fuse_projections
from models.linear import use_cpu_linear
from models.loader import load_model

from tests.helpers.tiny_checkpoint import build_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # Tied embeddings (the [N, K] head); a vocabulary of 520, not a multiple of 16, so the
    # weights cannot be packed for AMX and the small-batch kernel serves.
    return build_checkpoint(tmp_path_factory.mktemp("lin"), "llama")


@pytest.fixture(scope="module")
def packable_checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("amx"), "llama", vocab_size=512)


@pytest.mark.parametrize("which, impl", [("checkpoint", "cpu"), ("packable_checkpoint", "amx")])
def test_bfloat16_logits_follow_the_float32_model(which, impl, request):
    if impl == "amx" and not amx_ready():
        pytest.skip("this CPU has no AMX bfloat16 tiles")
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
