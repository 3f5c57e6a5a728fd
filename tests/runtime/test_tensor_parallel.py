"""A tensor-parallel engine on 8 CPU devices against the same engine on one device."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.request import SamplingParams
from tests.helpers.tiny_checkpoint import build_checkpoint

PROMPTS = [[5, 9, 200, 17, 3, 44, 81, 2, 9, 10, 11], [300, 301], [7] * 20, list(range(40, 73))]


@pytest.fixture(scope="module")
def eight_heads(tmp_path_factory):
    # 8 KV heads, MLP width and vocabulary divisible by 8: every sharded axis splits evenly.
    return build_checkpoint(tmp_path_factory.mktemp("tp8"), "llama", num_attention_heads=16, num_key_value_heads=8,
                            head_dim=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2)


def _greedy(folder, tensor_parallel: int, backend: str = "reference"):
    engine = Engine.from_model_dir(folder, config=EngineConfig(
        block_size=8, num_blocks=64, max_num_seqs=4, max_num_batched_tokens=32, token_buckets=(4, 32),
        attention_backend=backend), tensor_parallel=tensor_parallel)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params).request_id for p in PROMPTS]
    done = engine.run_to_completion()
    return engine, [done[i][0].token_ids for i in ids]


def test_eight_devices_give_the_greedy_tokens_of_one(eight_heads):
    assert len(jax.devices()) == 8
    _, one = _greedy(eight_heads, 1)
    engine, eight = _greedy(eight_heads, 8)
    assert eight == one
    assert all(len(t) == 8 for t in one)
    # The weights and the KV cache really are split: heads, MLP and KV heads over the 8 devices.
    layer = engine.model.state["layers"][0]
    assert layer["self_attn"]["qkv"]["q_proj"]["weight"].get_value().sharding.spec == P(None, "model", None)
    assert layer["mlp"]["gate_proj"]["weight"].get_value().sharding.spec == P(None, "model")
    k_pages = engine.runner.kv_cache[0][0]
    assert k_pages.sharding.spec[2] == "model"  # [pages, page_size, kv_heads, head_dim]
    assert k_pages.addressable_shards[0].data.shape == (64, 8, 1, 64)


def test_the_kernel_runs_per_device_under_shard_map(eight_heads):
    _, reference = _greedy(eight_heads, 1)
    engine, kernel = _greedy(eight_heads, 8, backend="pallas_interpret")
    assert engine.runner.attention_mesh is not None
    assert kernel == reference
