"""Fused q/k/v and gate/up projections compute what the separate ones do."""

import jax
import numpy as np
import pytest
from flax import nnx

from models.forward import sequence_logits
from models.fusion import fuse_projections
from models.loader import load_model
from models.sharding import make_mesh

from tests.helpers.tiny_checkpoint import build_checkpoint


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # plain, q/k/v biases, q/k norms
def test_fused_model_gives_the_same_logits(tmp_path, arch):
    model = load_model(build_checkpoint(tmp_path, arch))
    fused = fuse_projections(model)
    layer = nnx.merge(fused.graphdef, fused.state).layers[0]
    cfg = model.cfg
    assert layer.self_attn.qkv_proj.shape == (cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim)
    assert layer.mlp.gate_up_proj.shape == (cfg.hidden_size, 2 * cfg.intermediate_size)
    assert not hasattr(layer.self_attn, "q_proj") and not hasattr(layer.mlp, "up_proj")
    tokens = jax.numpy.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11)), jax.numpy.int32)
    want = sequence_logits(model.graphdef, model.state, tokens)
    got = sequence_logits(fused.graphdef, fused.state, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert fuse_projections(fused) is fused  # an engine built from a served model's weights


def test_multi_device_models_are_left_as_they_are(tmp_path):
    if len(jax.devices()) < 2:
        pytest.skip("needs two devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
    model = load_model(build_checkpoint(tmp_path, "llama", num_attention_heads=4, num_key_value_heads=2),
                       mesh=make_mesh(2))
    assert fuse_projections(model) is model
