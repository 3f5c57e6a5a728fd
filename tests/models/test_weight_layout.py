"""The weight layouts an execution plan chooses compute what the checkpoint layout does, and
each weight is one projection of one declared layout."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models.llama
from models.forward import sequence_logits
from models.loader import lay_out, load_model
from models.mlp import FusedMLP, MLP
from models.projection import CHECKPOINT_LAYOUT, Dense, MergeHeads, Packed, SplitHeads, Transposed, WeightLayout
from models.qkv import FusedQKV, SplitQKV
from models.sharding import make_mesh

from tests.helpers.tiny_checkpoint import build_checkpoint

FUSED = WeightLayout("xla", fused=True)


def _logits(model, tokens):
    return np.asarray(sequence_logits(model.graphdef, model.state, tokens))


def _tokens(model, length, seed):
    return jnp.asarray(np.random.default_rng(seed).integers(0, model.cfg.vocab_size, (1, length)), jnp.int32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # A vocabulary of 520, not a multiple of 16: the head cannot be packed.
    return build_checkpoint(tmp_path_factory.mktemp("lin"), "llama")


@pytest.fixture(scope="module")
def packable_checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("packed"), "llama", vocab_size=512)


def test_the_checkpoint_layout_splits_by_heads_and_ties_the_head_to_the_embedding(tmp_path):
    model = load_model(build_checkpoint(tmp_path, "llama", tie_word_embeddings=True))
    module = nnx.merge(model.graphdef, model.state)
    attn, cfg = module.layers[0].self_attn, model.cfg
    assert model.layout == CHECKPOINT_LAYOUT
    assert isinstance(attn.qkv, SplitQKV) and isinstance(attn.qkv.q_proj, SplitHeads)
    assert attn.qkv.k_proj.weight.shape == (cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim)
    assert isinstance(attn.o_proj, MergeHeads) and isinstance(module.layers[0].mlp, MLP)
    # One weight with two uses: the state holds the table once, and no separate head.
    assert isinstance(module.lm_head, Transposed) and module.lm_head.weight is module.embed_tokens
    assert [p for p, _ in nnx.to_flat_state(model.state) if p[0] != "layers"] == [("embed_tokens",), ("norm", "weight")]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # plain, q/k/v biases, q/k norms
def test_fused_weights_give_the_same_logits(tmp_path, arch):
    model = load_model(build_checkpoint(tmp_path, arch))
    fused = lay_out(model, FUSED)
    layer, cfg = nnx.merge(fused.graphdef, fused.state).layers[0], model.cfg
    assert fused.layout == FUSED and isinstance(layer.self_attn.qkv, FusedQKV) and isinstance(layer.mlp, FusedMLP)
    assert layer.self_attn.qkv.proj.weight.shape == (cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim)
    assert layer.self_attn.o_proj.weight.shape == (cfg.num_heads * cfg.head_dim, cfg.hidden_size)
    assert layer.mlp.gate_up_proj.weight.shape == (cfg.hidden_size, 2 * cfg.intermediate_size)
    assert {type(p) for p in (layer.self_attn.qkv.proj, layer.self_attn.o_proj, layer.mlp.down_proj)} == {Dense}
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11)), jnp.int32)
    np.testing.assert_allclose(_logits(fused, tokens), _logits(model, tokens), rtol=1e-5, atol=1e-5)
    assert lay_out(fused, FUSED) is fused  # an engine built from a served model's weights


def test_a_sharded_model_keeps_the_checkpoint_layout(tmp_path):
    if len(jax.devices()) < 2:
        pytest.skip("needs two devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
    model = load_model(build_checkpoint(tmp_path, "llama", num_attention_heads=4, num_key_value_heads=2),
                       mesh=make_mesh(2))
    assert lay_out(model, CHECKPOINT_LAYOUT) is model
    with pytest.raises(ValueError, match="on 2 devices cannot be laid out as"):
        lay_out(model, FUSED)


@pytest.mark.parametrize("which, linear, kind", [("checkpoint", "cpu", Dense), ("packable_checkpoint", "packed", Packed)])
def test_bfloat16_kernels_follow_the_float32_model(which, linear, kind, request):
    checkpoint = request.getfixturevalue(which)
    reference = load_model(checkpoint, "float32")
    plain = load_model(checkpoint, "bfloat16")
    served = lay_out(plain, WeightLayout(linear, fused=True))
    module = nnx.merge(served.graphdef, served.state)
    layer = module.layers[0]
    for proj in (layer.self_attn.qkv.proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj,
                 module.lm_head):
        assert type(proj) is kind and getattr(proj, "impl", "packed") == linear
    tokens = _tokens(reference, 12, 1)
    want, got, xla = _logits(reference, tokens), _logits(served, tokens), _logits(plain, tokens)
    # bfloat16 weights and activations: both paths sit within bfloat16 rounding of float32.
    scale = np.abs(want).max()
    assert np.abs(got - want).max() / scale < 0.03
    assert np.abs(got - xla).max() / scale < 0.03


def test_float32_kernels_match_xla_with_the_tied_head_laid_out_for_them(tmp_path):
    # The kernels' float32 path: q/k/v with rotary embeddings in one call, the tied head as a
    # [K, N] copy. Decode-sized (12 rows) and prompt-sized (80 rows, XLA's products) alike.
    plain = load_model(build_checkpoint(tmp_path, "llama", tie_word_embeddings=True), "float32")
    served = lay_out(plain, WeightLayout("cpu", fused=True))
    module = nnx.merge(served.graphdef, served.state)
    assert isinstance(module.lm_head, Dense) and module.lm_head.impl == "cpu"
    np.testing.assert_array_equal(np.asarray(module.lm_head.weight[...]), np.asarray(module.embed_tokens[...]).T)
    for length in (12, 80):
        tokens = _tokens(plain, length, length)
        want, got = _logits(plain, tokens), _logits(served, tokens)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_layouts_that_are_not_served_are_refused():
    with pytest.raises(ValueError, match="the 'packed' products serve fused weights"):
        WeightLayout("packed", fused=False)
    with pytest.raises(ValueError, match="linear='amx' is unknown; choose one of xla, cpu, packed"):
        WeightLayout("amx", fused=True)


def test_the_model_never_asks_which_attributes_exist():
    source = inspect.getsource(models.llama)
    assert "hasattr" not in source and "getattr" not in source
