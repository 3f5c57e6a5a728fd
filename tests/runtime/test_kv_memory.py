"""--gpu-memory-utilization: the KV cache takes what the fraction leaves after the weights and the
largest step's workspace, on a device that reports its memory; the CPU keeps the explicit size.
The device's statistics are faked (this machine has no GPU); the workspace is measured for real."""

import logging

import pytest

import runtime.engine as engine_module
from runtime import kv_memory
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.kv_memory import HEADROOM_BYTES, DeviceMemory, apply_pool_fraction, device_memory, kv_cache_budget
from runtime.request import SamplingParams
from runtime.runner import Runner
from serving.config import ServerConfig

GiB, MiB = 2**30, 2**20
# An H200 as jax reports it with the pool at 0.9: 143,771 MiB on the card.
H200_POOL = int(0.9 * 143_771 * MiB)


def test_the_budget_is_the_granted_fraction_less_weights_workspace_and_headroom():
    memory = device_memory({"bytes_limit": H200_POOL, "bytes_in_use": 16 * GiB, "peak_bytes_in_use": 17 * GiB}, 0.9)
    assert memory == DeviceMemory(H200_POOL, 16 * GiB, 0.9) and abs(memory.total - 143_771 * MiB) <= 1  # the pool rounded down
    assert kv_cache_budget(memory, 0.9, 3 * GiB) == H200_POOL - 16 * GiB - 3 * GiB - HEADROOM_BYTES
    # Less than the pool: the fraction of the device decides.
    assert kv_cache_budget(memory, 0.5, 3 * GiB) == int(H200_POOL * 0.5 / 0.9) - 19 * GiB - HEADROOM_BYTES
    # jax's default pool (0.75) under a 0.9 flag: the pool caps what the KV cache can get.
    default_pool = device_memory({"bytes_limit": int(0.75 * 143_771 * MiB), "bytes_in_use": 16 * GiB}, 0.75)
    assert kv_cache_budget(default_pool, 0.9, 0, headroom=0) == int(0.75 * 143_771 * MiB) - 16 * GiB
    assert kv_cache_budget(memory, 0.1, 0) < 0  # the weights alone exceed 10% of the card


def test_a_device_without_allocator_statistics_sizes_nothing_and_the_flag_sets_jax_s_pool():
    assert device_memory(None, 0.75) is None  # the CPU
    assert device_memory({"bytes_in_use": 5}, 0.75) is None
    assert kv_memory.pool_fraction({}) == 0.75 and kv_memory.pool_fraction({"XLA_PYTHON_CLIENT_MEM_FRACTION": ".5"}) == 0.5
    env = {}
    apply_pool_fraction(0.9, env)
    assert env == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}
    apply_pool_fraction(0.8, env)  # the user's (or an earlier) value wins
    assert env == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}


def _config(**changes) -> EngineConfig:
    return EngineConfig(**dict(dict(block_size=4, max_num_seqs=8, max_num_batched_tokens=32, token_buckets=(8, 32),
                                    gpu_memory_utilization=0.25), **changes))


PER_BLOCK = 2 * 2 * 4 * 2 * 16 * 4  # tiny llama: K and V, 2 layers, 4-token pages, 2 KV heads of 16, float32


def test_the_engine_fills_what_the_fraction_leaves_with_pages(checkpoint, monkeypatch, caplog):
    limit = 3 * GiB  # pool 0.75 (jax's default): a 4 GiB device, 1 GiB of it granted at 0.25
    in_use = GiB - HEADROOM_BYTES - 2 * MiB  # the fake weights leave 2 MiB for workspace and cache
    monkeypatch.setattr(engine_module, "device_memory_stats", lambda mesh: [{"bytes_limit": limit, "bytes_in_use": in_use}])
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    measured = []
    real = Runner.workspace_bytes
    monkeypatch.setattr(Runner, "workspace_bytes", lambda self: measured.append(real(self)) or measured[-1])
    with caplog.at_level(logging.INFO, logger="runtime.engine"):
        engine = Engine.from_model_dir(checkpoint("llama"), config=_config())
    [workspace] = measured
    # The step's inputs alone: logit adjustments for 8 rows of 520 ids (counts int32, seen and
    # banned bool, the grammar's bit mask) and the rest of the costliest variant, float32 logits of 32 tokens.
    assert workspace >= 8 * 520 * 6 + 32 * 520 * 4
    blocks = (2 * MiB - workspace) // PER_BLOCK
    assert engine.blocks.num_blocks == engine.runner.num_blocks == blocks
    assert engine.runner.kv_cache[0][0].shape == (blocks, 4, 2, 16)
    assert any(f"KV cache: {blocks} pages" in r.getMessage() for r in caplog.records)
    engine.add_request([5, 9, 200, 17], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), request_id="r")
    assert len(engine.run_to_completion()["r"][0].token_ids) == 3


def test_a_fraction_that_leaves_nothing_is_refused_with_the_figures(checkpoint, monkeypatch):
    monkeypatch.setattr(engine_module, "device_memory_stats",
                        lambda mesh: [{"bytes_limit": 3 * GiB, "bytes_in_use": GiB}])
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0.25 leaves no room for the KV cache: of 1.00 GiB, "
                                         r"1.00 GiB are in use \(weights\)"):
        Engine.from_model_dir(checkpoint("llama"), config=_config())


def test_on_the_cpu_the_explicit_size_stands_and_num_blocks_wins(checkpoint):
    plain = Engine.from_model_dir(checkpoint("llama"), config=_config(gpu_memory_utilization=None,
                                                                       kv_cache_memory_bytes=MiB))
    flagged = Engine.from_model_dir(checkpoint("llama"), config=_config(kv_cache_memory_bytes=MiB))
    assert plain.blocks.num_blocks == flagged.blocks.num_blocks == min(MiB // PER_BLOCK, 8 * 256 // 4) == 512
    assert Engine.from_model_dir(checkpoint("llama"), config=_config(num_blocks=40)).blocks.num_blocks == 40


def test_the_server_grants_90_percent_unless_a_kv_size_is_given():
    config = ServerConfig.from_sources(None, {})
    engine = config.engine_config()
    assert (config.gpu_memory_utilization, engine.gpu_memory_utilization, engine.kv_cache_memory_bytes) == (0.9, 0.9, 2 * GiB)
    explicit = ServerConfig.from_sources(None, {"TESSERA_KV_CACHE_MEMORY_GIB": "0.5"}).engine_config()
    assert (explicit.gpu_memory_utilization, explicit.kv_cache_memory_bytes) == (None, GiB // 2)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=1.5 must be in \(0, 1\]"):
        ServerConfig.from_sources(None, {"TESSERA_GPU_MEMORY_UTILIZATION": "1.5"})
