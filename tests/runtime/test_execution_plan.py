"""The execution plan: chosen once from the device, the mesh and the config; forced choices
that cannot run fail at start-up; the engine logs it once and lays its model out by it."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest

import runtime.backend as backend
import runtime.execution_plan as execution_plan
from models.config import ModelConfig
from models.projection import WeightLayout
from models.sharding import make_mesh
from runtime.backend import BackendError
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.execution_plan import choose_plan
from runtime.request import SamplingParams


@pytest.fixture(scope="module")
def cfg(checkpoint) -> ModelConfig:
    return ModelConfig.from_dir(checkpoint("llama"))  # vocabulary 520: its head cannot be packed


@pytest.fixture(scope="module")
def packable_cfg(checkpoint) -> ModelConfig:
    return ModelConfig.from_dir(checkpoint("llama", vocab_size=512))


def _labels(**changes) -> dict[str, str]:
    one_cpu = dict(device="cpu", tensor_parallel="1", dtype="float32", attention="cpu", linear="cpu", fused="true",
                   layout="dense", sampling="cpu")
    return one_cpu | changes


def test_one_cpu_with_the_kernel_library_gets_the_kernels(cfg, packable_cfg):
    one = make_mesh(1)
    assert choose_plan(EngineConfig(), cfg, "float32", one).labels() == _labels()
    plan = choose_plan(EngineConfig(), packable_cfg, "bfloat16", one)
    assert plan.labels() == _labels(dtype="bfloat16", linear="packed", layout="packed")
    assert plan.weights == WeightLayout("packed", fused=True)
    # A head of 520 columns does not pack: the small-batch kernel serves the bfloat16 model.
    assert choose_plan(EngineConfig(), cfg, "bfloat16", one).labels() == _labels(dtype="bfloat16")


def test_a_mesh_keeps_the_checkpoint_layout_and_xla_products(cfg):
    plan = choose_plan(EngineConfig(), cfg, "float32", make_mesh(2))
    # The attention kernel runs per device under shard_map; the products are split by heads.
    assert plan.labels() == _labels(tensor_parallel="2", linear="xla", fused="false", sampling="xla")


def test_a_gpu_gets_the_pallas_kernel_and_xla_products(checkpoint):
    head64 = ModelConfig.from_dir(checkpoint("llama", num_attention_heads=8, num_key_value_heads=2, head_dim=64))
    gpu = SimpleNamespace(devices=np.array([SimpleNamespace(platform="gpu")]), size=1)
    plan = choose_plan(EngineConfig(), head64, "bfloat16", gpu)
    assert plan.labels() == _labels(device="gpu", dtype="bfloat16", attention="pallas", linear="xla", sampling="xla")
    with pytest.raises(BackendError, match="linear 'cpu' runs on one CPU device, but this mesh is 1 x 'gpu'"):
        choose_plan(EngineConfig(linear="cpu"), head64, "bfloat16", gpu)


def test_without_the_kernel_library_everything_runs_in_xla(cfg, monkeypatch):
    monkeypatch.setattr(backend, "cpu_kernel_available", lambda: False)
    monkeypatch.setattr(execution_plan, "cpu_kernels_available", lambda: False)
    plan = choose_plan(EngineConfig(), cfg, "float32", make_mesh(1))
    assert plan.labels() == _labels(attention="reference", linear="xla", sampling="xla")
    with pytest.raises(BackendError, match="linear 'cpu' is unavailable: the C\\+\\+ library did not build"):
        choose_plan(EngineConfig(linear="cpu"), cfg, "float32", make_mesh(1))


def test_the_config_overrides_the_device_choice(cfg, packable_cfg, monkeypatch):
    monkeypatch.setenv("TESSERA_CPU_LINEAR", "1")  # variables are the settings' aliases, never read here
    monkeypatch.setenv("TESSERA_ATTENTION", "cpu")
    forced = EngineConfig(attention_backend="reference", linear="xla")
    assert choose_plan(forced, cfg, "float32", make_mesh(1)).labels() == _labels(attention="reference", linear="xla")
    plan = choose_plan(EngineConfig(linear="cpu"), packable_cfg, "bfloat16", make_mesh(1))
    assert plan.labels() == _labels(dtype="bfloat16")


@pytest.mark.parametrize("linear, dtype, devices, message", [
    ("packed", "float32", 1, "linear 'packed' packs bfloat16 weights, but the model is float32"),
    ("packed", "bfloat16", 1, "needs every projection's output width a multiple of 16"),
    ("cpu", "float32", 2, "linear 'cpu' runs on one CPU device, but this mesh is 2 x 'cpu'"),
    ("amx", "float32", 1, "linear 'amx' is unknown; choose one of xla, cpu, packed"),
])
def test_forced_choices_this_device_cannot_run_fail_at_start_up(cfg, linear, dtype, devices, message):
    with pytest.raises(BackendError, match=message):
        choose_plan(EngineConfig(linear=linear), cfg, dtype, make_mesh(devices))


def test_the_engine_logs_its_plan_once_and_serves_the_same_tokens_on_each(checkpoint, caplog):
    prompts = [[5, 9, 200, 17, 3, 44, 81, 2, 9, 10, 11], [300, 301], [7] * 20]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    tokens = {}
    for linear in ("xla", "cpu"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="runtime.engine"):
            engine = Engine.from_model_dir(checkpoint("llama"), config=EngineConfig(
                block_size=8, num_blocks=32, max_num_seqs=4, max_num_batched_tokens=16, token_buckets=(4, 16),
                linear=linear))
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("execution plan:")]
        assert lines == [f"execution plan: device=cpu tensor_parallel=1 dtype=float32 attention=cpu linear={linear} "
                         "fused=true layout=dense sampling=cpu"]
        assert engine.model.layout == WeightLayout(linear, fused=True) == engine.plan.weights
        requests = [engine.add_request(p, params) for p in prompts]
        done = engine.run_to_completion()
        tokens[linear] = [done[r.request_id][0].token_ids for r in requests]
    assert tokens["cpu"] == tokens["xla"]
    assert [len(t) for t in tokens["xla"]] == [6, 6, 6]


def test_lora_products_take_the_kernels_on_gpus_that_suit_them(checkpoint, cfg):
    head64 = ModelConfig.from_dir(checkpoint("llama", num_attention_heads=8, num_key_value_heads=2, head_dim=64))
    gpu = SimpleNamespace(devices=np.array([SimpleNamespace(platform="gpu")]), size=1)
    lora = dict(max_loras=4, max_lora_rank=16)
    assert choose_plan(EngineConfig(**lora), head64, "bfloat16", gpu).labels()["lora"] == "pallas"
    # a rank the kernels cannot take: the XLA product serves it, unless the kernels were asked for
    assert choose_plan(EngineConfig(max_loras=4, max_lora_rank=24), head64, "bfloat16", gpu).lora == "xla"
    with pytest.raises(BackendError, match="LoRA kernel 'pallas' cannot serve this model: max LoRA rank 24"):
        choose_plan(EngineConfig(max_loras=4, max_lora_rank=24, lora_kernel="pallas"), head64, "bfloat16", gpu)
    assert choose_plan(EngineConfig(**lora), cfg, "float32", make_mesh(1)).labels() == _labels(lora="xla")
    assert "lora" not in choose_plan(EngineConfig(), cfg, "float32", make_mesh(1)).labels()  # no adapters served
    with pytest.raises(BackendError, match="LoRA kernel 'pallas' needs a CUDA GPU"):
        choose_plan(EngineConfig(lora_kernel="pallas", **lora), cfg, "float32", make_mesh(1))
    forced = EngineConfig(lora_kernel="pallas_interpret", **lora)
    assert choose_plan(forced, cfg, "float32", make_mesh(1)).lora == "pallas_interpret"
    # on a mesh XLA splits the product with the weights; the kernels run on one device only
    gpus = SimpleNamespace(devices=np.array([SimpleNamespace(platform="gpu")] * 2), size=2)
    assert choose_plan(EngineConfig(**lora), head64, "bfloat16", gpus).lora == "xla"
    with pytest.raises(BackendError, match="LoRA kernel 'pallas_interpret' runs on one device; with tensor parallel 2"):
        choose_plan(forced, cfg, "float32", make_mesh(2))
