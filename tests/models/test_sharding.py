"""The same model on one device and on a mesh gives the same logits."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from models.loader import load_model
from models.sharding import ShardingRules, make_mesh
from tests.helpers.paged_run import tessera_logits

PROMPT = [5, 77, 300, 12, 9, 411, 250, 33, 71, 2, 199, 64, 480, 7]
CONTINUATION = [100, 7, 350]


def _leaf(model, *path) -> jax.Array:
    return dict((tuple(p), v) for p, v in nnx.to_flat_state(model.state))[path].get_value()


def _spec(model, *path):
    return _leaf(model, *path).sharding.spec


def test_eight_cpu_devices_are_visible():
    assert len(jax.devices()) == 8


@pytest.mark.parametrize("arch, devices", [("mistral", 8), ("qwen2", 4), ("llama", 2)])
def test_mesh_logits_equal_single_device(checkpoint, arch, devices):
    folder = checkpoint(arch)
    single = tessera_logits(load_model(folder, mesh=make_mesh(1)), PROMPT, CONTINUATION)
    sharded_model = load_model(folder, mesh=make_mesh(devices))
    sharded = tessera_logits(sharded_model, PROMPT, CONTINUATION)
    for step, (a, b) in enumerate(zip(single, sharded, strict=True)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"step {step}")


def test_heads_and_mlp_are_split_on_the_model_axis(checkpoint):
    # Mistral checkpoint: 8 heads, 2 KV heads, MLP 128, vocab 520 on an 8-device mesh.
    model = load_model(checkpoint("mistral"), mesh=make_mesh(8))
    assert _spec(model, "layers", 0, "self_attn", "qkv", "q_proj", "weight") == P(None, "model", None)
    assert _spec(model, "layers", 0, "self_attn", "o_proj", "weight") == P("model", None, None)
    assert _spec(model, "layers", 0, "mlp", "gate_proj", "weight") == P(None, "model")
    assert _spec(model, "layers", 0, "mlp", "down_proj", "weight") == P("model", None)
    assert _spec(model, "embed_tokens") == P("model", None)
    # 2 KV heads cannot be split 8 ways: replicated, as is the KV cache.
    assert _spec(model, "layers", 0, "self_attn", "qkv", "k_proj", "weight") == P(None, None, None)
    assert model.kv_cache_sharding(4, 4).spec == P(None, None, None, None)
    shard_shapes = {s.data.shape for s in _leaf(model, "layers", 0, "self_attn", "qkv", "q_proj", "weight").addressable_shards}
    assert shard_shapes == {(64, 1, 8)}


def test_kv_cache_is_split_by_kv_head(checkpoint):
    model = load_model(checkpoint("qwen2"), mesh=make_mesh(4))
    assert model.kv_cache_sharding(4, 4).spec == P(None, None, "model", None)
    k_pages, _ = model.allocate_kv_cache(4, 4)[0]
    assert {s.data.shape for s in k_pages.addressable_shards} == {(4, 4, 1, 16)}


def test_undividable_axes_stay_replicated():
    mesh = make_mesh(8)
    rules = ShardingRules()
    assert rules.spec(("embed", "heads", "head_dim"), (64, 12, 16), mesh) == P(None, None, None)
    assert rules.spec(("embed", "heads", "head_dim"), (64, 16, 16), mesh) == P(None, "model", None)


def test_mesh_larger_than_devices_is_refused():
    with pytest.raises(ValueError, match="tensor_parallel=16 but 8 devices are visible"):
        make_mesh(16)
