"""LoRA adapters in the engine against transformers + peft, and the adapter registry's rules."""

import json

import numpy as np
import pytest
import torch

from models import lora
from models.lora import AdapterError
from runtime.adapters import AdapterNotFound
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.request import SamplingParams
from tests.helpers.compiles import count_compiles
from tests.helpers.tiny_adapter import build_adapter, load_peft_reference

GREEDY = dict(temperature=0.0, ignore_eos=True)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def adapters(checkpoint, tmp_path_factory):
    folder = checkpoint("llama")
    root = tmp_path_factory.mktemp("adapters")
    return folder, {
        # rank 4 on attention only, plain scaling; rank 8 on every target with rsLoRA and one
        # layer's own alpha
        "small": build_adapter(folder, root / "small", rank=4, targets=("q_proj", "v_proj", "o_proj"), alpha=8, seed=1),
        "big": build_adapter(folder, root / "big", rank=8, targets=ALL, alpha=16, rslora=True, seed=2,
                             alpha_pattern={"model.layers.1.mlp.down_proj": 4}),
    }


def _engine(folder, **config) -> Engine:
    # one token bucket: each engine compiles one step program (two with the slot copy)
    defaults = dict(block_size=4, max_num_seqs=8, max_num_batched_tokens=32, token_buckets=(32,), num_blocks=64,
                    max_loras=2, max_lora_rank=8)
    return Engine.from_model_dir(folder, config=EngineConfig(**{**defaults, **config}))


def _peft_greedy(model, adapter: str | None, prompt: list[int], n: int) -> list[int]:
    kwargs = dict(attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False, max_new_tokens=n,
                  min_new_tokens=n, pad_token_id=0)
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                out = model.generate(input_ids=torch.tensor([prompt]), **kwargs)
        else:
            model.set_adapter(adapter)
            out = model.generate(input_ids=torch.tensor([prompt]), **kwargs)
    return out[0, len(prompt):].tolist()


rng = np.random.RandomState(0)
PROMPTS = [rng.randint(0, 500, size=rng.randint(5, 20)).tolist() for _ in range(6)]
WHICH = [None, "small", "big", "big", None, "small"]


@pytest.fixture(scope="module")
def expected(adapters):
    folder, paths = adapters
    reference = load_peft_reference(folder, paths)
    answers = [_peft_greedy(reference, a, p, 10) for p, a in zip(PROMPTS, WHICH)]
    # the adapters change the answer: the test would notice an adapter left out
    assert answers[1] != _peft_greedy(reference, None, PROMPTS[1], 10)
    assert answers[2] != _peft_greedy(reference, None, PROMPTS[2], 10)
    return answers


@pytest.mark.parametrize("overlap, kernel, max_rank", [
    (False, "xla", 8), (True, "xla", 8),
    # the Pallas kernels (kernels/lora_bgmv.py) in the interpreter: rank 8 takes the per-token
    # BGMV form; rank 16 with the 32-token bucket the 16-token SGMV form
    (False, "pallas_interpret", 8), (False, "pallas_interpret", 16),
], ids=["series", "overlapped", "bgmv-interpreted", "sgmv-interpreted"])
def test_two_adapters_and_the_base_in_one_batch_match_peft(adapters, expected, overlap, kernel, max_rank,
                                                           monkeypatch):
    folder, paths = adapters
    if kernel != "xla":  # the kernels, not the XLA product, must be what runs
        monkeypatch.setattr(lora, "lora_delta", lambda *a: pytest.fail("the XLA LoRA product ran"))
    engine = _engine(folder, async_scheduling=overlap, lora_kernel=kernel, max_lora_rank=max_rank)
    assert engine.plan.lora == kernel
    assert _greedy_over_the_adapters(engine, paths) == expected


def _greedy_over_the_adapters(engine, paths) -> list[list[int]]:
    """The six prompts' greedy tokens, each on its adapter of WHICH (or the base), in one batch."""
    for name, path in paths.items():
        engine.adapters.load(name, path)
    for i, (p, a) in enumerate(zip(PROMPTS, WHICH)):
        engine.add_request(p, SamplingParams(max_tokens=10, **GREEDY), request_id=f"r{i}", adapter=a or "")
    done = engine.run_to_completion()
    return [done[f"r{i}"][0].token_ids for i in range(len(PROMPTS))]


def test_tensor_parallel_serves_the_same_tokens_as_peft(adapters, expected):
    # Two CPU devices: the weights split by heads and MLP columns, the adapter stacks
    # replicated, the products split by XLA with the weights they add to.
    folder, paths = adapters
    engine = Engine.from_model_dir(folder, tensor_parallel=2, config=EngineConfig(
        block_size=4, max_num_seqs=8, max_num_batched_tokens=32, token_buckets=(32,), num_blocks=64, max_loras=2,
        max_lora_rank=8))
    assert (engine.model.mesh.size, engine.plan.lora) == (2, "xla")
    assert _greedy_over_the_adapters(engine, paths) == expected
    assert len(engine.adapters.stacks["q_proj"]["a"].sharding.device_set) == 2


def test_slots_evict_by_lru_and_loading_never_compiles(adapters):
    folder, paths = adapters
    engine = _engine(folder, max_loras=1)
    engine.runner.warm_up((False,))  # no penalties below: the adjusted variant is not needed
    engine.adapters.load("small", paths["small"])
    engine.adapters.load("big", paths["big"])
    params = SamplingParams(max_tokens=3, **GREEDY)
    with count_compiles() as compiles:
        first = engine.add_request([1, 2, 3, 4, 5], params, adapter="small")
        engine.add_request([1, 2, 3, 4, 5], params, adapter="big")  # waits: one slot
        engine.run_to_completion()
        engine.adapters.load("small", paths["big"])  # replaced under the same name
        again = engine.add_request([1, 2, 3, 4, 5], params, adapter="small")
        done = engine.run_to_completion()
    assert compiles() == 0
    c = engine.adapters.counters
    assert (c.loads, c.evictions, c.misses) == (3, 2, 3)
    assert first.adapter_id == "small@1" and again.adapter_id == "small@3"
    held = [(a["version"], a["retired"]) for a in engine.adapters.snapshot()["adapters"]]
    assert held == [("small@1", True), ("big@2", False), ("small@3", False)]  # bound lately: kept a while
    engine.adapters.sweep(set(), grace_s=0)
    assert [a["version"] for a in engine.adapters.snapshot()["adapters"]] == ["big@2", "small@3"]
    assert done[again.request_id][0].token_ids  # served


def test_unknown_corrupt_and_too_large_adapters_are_refused(adapters, tmp_path):
    folder, paths = adapters
    engine = _engine(folder, max_lora_rank=4)
    with pytest.raises(AdapterNotFound):
        engine.make_request([1, 2], SamplingParams(), adapter="nope")
    with pytest.raises(AdapterError, match="rank 8; this server takes ranks up to 4"):
        engine.adapters.load("big", paths["big"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (bad / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(AdapterError):
        engine.adapters.load("bad", bad)
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        engine.adapters.load("dora", dora)
    engine.adapters.load("small", paths["small"])  # the others still load and serve
    assert [v.name for v in engine.adapters.served()] == ["small"]
    assert engine.adapters.counters.load_failures == 3
