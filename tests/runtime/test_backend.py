"""Choosing the attention backend, and the engine on the Pallas kernel (interpreted on CPU)."""

import pytest

from runtime.backend import BackendError, resolve_attention_backend
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.request import SamplingParams
from models.config import ModelConfig
from tests.helpers.tiny_checkpoint import build_checkpoint


@pytest.fixture(scope="module")
def head64(tmp_path_factory):
    # head_dim 64 and GQA 4, which the kernel supports; tiny otherwise.
    return build_checkpoint(tmp_path_factory.mktemp("h64"), "llama", num_attention_heads=8, num_key_value_heads=2,
                            head_dim=64, num_hidden_layers=2)


def test_defaults_follow_the_device_and_ignore_the_environment(head64, monkeypatch):
    cfg = ModelConfig.from_dir(head64)
    monkeypatch.setenv("TESSERA_ATTENTION", "reference")  # an alias of the flag, read by the settings only
    assert resolve_attention_backend(None, cfg, "bfloat16", 16, platform="cpu") == "cpu"
    assert resolve_attention_backend(None, cfg, "bfloat16", 16, platform="gpu") == "pallas"
    assert resolve_attention_backend("reference", cfg, "bfloat16", 16, platform="gpu") == "reference"


@pytest.mark.parametrize(
    "requested, platform, page, message",
    [
        ("pallas", "cpu", 16, "'pallas' needs a CUDA GPU, but jax's backend here is 'cpu'"),
        ("triton", "gpu", 16, "'triton' is unknown; choose one of pallas, cpu, reference, pallas_interpret"),
        ("cpu", "gpu", 16, "'cpu' runs on CPUs only, but jax's backend here is 'gpu'"),
        ("pallas", "gpu", 4, "cannot serve this model: page size 4"),
    ],
)
def test_unsupported_choices_fail_at_start_up(head64, requested, platform, page, message):
    with pytest.raises(BackendError, match=message.replace("(", r"\(")):
        resolve_attention_backend(requested, ModelConfig.from_dir(head64), "bfloat16", page, platform=platform)


def test_engine_refuses_pallas_on_cpu_before_serving(head64):
    with pytest.raises(BackendError, match="needs a CUDA GPU"):
        Engine.from_model_dir(head64, config=EngineConfig(block_size=8, num_blocks=16, attention_backend="pallas"))


def test_cpu_default_falls_back_to_the_reference_when_the_kernel_cannot_build(head64, monkeypatch):
    import runtime.backend as backend

    monkeypatch.setattr(backend, "cpu_kernel_available", lambda: False)
    cfg = ModelConfig.from_dir(head64)
    assert resolve_attention_backend(None, cfg, "float32", 16, platform="cpu") == "reference"
    with pytest.raises(BackendError, match="'cpu' is unavailable: its C\\+\\+ library did not build"):
        resolve_attention_backend("cpu", cfg, "float32", 16, platform="cpu")


def test_engine_on_the_kernels_gives_the_reference_tokens(head64, monkeypatch):
    import kernels.ragged_paged_attention as pallas_kernel

    def no_table_in_xla(*args, **kwargs):
        raise AssertionError("the runner sends every step's work table; the kernel must not build one")

    # The Pallas kernel reads the table the runner built on the host, in every layer.
    monkeypatch.setattr(pallas_kernel, "work_table", no_table_in_xla)
    prompts = [[5, 9, 200, 17, 3, 44, 81, 2, 9, 10, 11], [300, 301], [7] * 20]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    results = {}
    for backend in ("reference", "cpu", "pallas_interpret"):
        engine = Engine.from_model_dir(head64, config=EngineConfig(
            block_size=8, num_blocks=32, max_num_seqs=4, max_num_batched_tokens=16, token_buckets=(4, 16),
            attention_backend=backend))
        requests = [engine.add_request(p, params) for p in prompts]
        done = engine.run_to_completion()
        results[backend] = [done[r.request_id][0].token_ids for r in requests]
    assert results["pallas_interpret"] == results["reference"]
    assert results["cpu"] == results["reference"]
    assert all(len(t) == 6 for t in results["reference"])
