"""FP8 (e4m3) weights with per-output-channel scales: the quantizer's bounds, the product against
float64, the demo model against its float32 self (top-1 agreement and logit error over 512
positions of English), the engine serving it, and the combinations it refuses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.config import ModelConfig
from models.forward import sequence_logits
from models.fp8 import E4M3_MAX, FP8, dequantize_fp8, fp8_linear, quantize_fp8
from models.loader import lay_out, load_model
from models.projection import Fp8Dense, Transposed, WeightLayout
from models.sharding import make_mesh
from perf.fp8_agreement import FP8_LAYOUT, TEXT, agreement, text_windows
from runtime.backend import BackendError
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.execution_plan import choose_plan
from runtime.request import SamplingParams
from serving.config import ServerConfig

DEMO = "models/demo"


@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO, "float32")


@pytest.fixture(scope="module")
def demo_fp8(demo):
    return lay_out(demo, FP8_LAYOUT)


def test_each_output_channel_gets_its_largest_magnitude_over_448_and_values_round_to_e4m3():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (96, 40)).astype(np.float32) * rng.uniform(0.1, 10, 40)  # channels of unlike ranges
    w[:, 7] = 0.0  # an all-zero channel
    q, scale = quantize_fp8(jnp.asarray(w))
    assert q.dtype == FP8 and q.shape == (40, 96) and scale.dtype == jnp.float32 and scale.shape == (40,)
    amax = np.abs(w).max(axis=0)
    np.testing.assert_allclose(np.asarray(scale)[amax > 0], amax[amax > 0] / E4M3_MAX, rtol=1e-7)
    assert float(scale[7]) == 1.0 and not np.asarray(q[7].astype(jnp.float32)).any()
    back = np.asarray(dequantize_fp8(q, scale))
    # The largest value of each channel lands exactly on 448 x scale; the rest within half an e4m3
    # step: 3 mantissa bits (2^-4 relative), or 2^-10 x scale in the subnormal range.
    np.testing.assert_allclose(np.abs(back).max(axis=0), amax, rtol=1e-6)
    bound = np.maximum(2.0**-4 * np.abs(w), 2.0**-10 * np.asarray(scale)[None, :])
    assert np.all(np.abs(back - w) <= bound * (1 + 1e-6))


def test_the_product_is_exact_on_the_quantized_operands_and_close_to_the_float_one():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (5, 96)).astype(np.float32) * np.array([[0.01], [1], [30], [0.5], [2]], np.float32)
    w = rng.normal(0, 0.05, (96, 48)).astype(np.float32)
    q, scale = quantize_fp8(jnp.asarray(w))
    got = np.asarray(fp8_linear(jnp.asarray(x), q, scale))
    # Reference in float64 from the same e4m3 operands (rows of x quantized with their own scale).
    x_scale = np.abs(x).max(axis=1, keepdims=True) / E4M3_MAX
    xq = np.asarray(jnp.asarray(x / x_scale).astype(FP8).astype(jnp.float32), np.float64) * x_scale
    want = xq @ np.asarray(dequantize_fp8(q, scale), np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6
    exact = x.astype(np.float64) @ w
    for row in range(5):  # each token's error is relative to its own size: the per-row scale at work
        assert np.linalg.norm(got[row] - exact[row]) / np.linalg.norm(exact[row]) < 0.05
    assert fp8_linear(jnp.asarray(x, jnp.bfloat16), q, scale).dtype == jnp.bfloat16


def test_the_fp8_layout_quantizes_every_layer_s_projections_and_keeps_embedding_and_head(demo, demo_fp8):
    module = nnx.merge(demo_fp8.graphdef, demo_fp8.state)
    cfg = demo.cfg
    layer = module.layers[0]
    for proj, (n, k) in [(layer.self_attn.qkv.proj, ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, 256)),
                         (layer.self_attn.o_proj, (256, cfg.num_heads * cfg.head_dim)),
                         (layer.mlp.gate_up_proj, (2 * cfg.intermediate_size, 256)),
                         (layer.mlp.down_proj, (256, cfg.intermediate_size))]:
        assert type(proj) is Fp8Dense and proj.weight.shape == (n, k) and proj.weight[...].dtype == FP8
        assert proj.scale.shape == (n,) and proj.scale[...].dtype == jnp.float32
    assert isinstance(module.lm_head, Transposed) and module.embed_tokens[...].dtype == jnp.float32
    assert demo_fp8.layout.name == "fp8"
    weights = lambda m: sum(x.nbytes for x in jax.tree.leaves(m.state))  # noqa: E731
    # The demo's 4 layers: 3,211,264 float32 weights -> 1 byte each plus 4 bytes per output channel.
    assert weights(demo) - weights(demo_fp8) == 3_211_264 * 3 - 4 * 4 * (768 + 256 + 1408 + 256)


def test_the_demo_model_in_fp8_agrees_with_float32_on_512_positions_of_english(demo, demo_fp8):
    # Measured here: 97.85% top-1 (501 of 512), max |logit error| 0.364, mean 0.0237, largest
    # logit ~15 (perf/results/fp8_agreement_cpu.md). The bounds leave room for another CPU's rounding.
    r = agreement(demo, demo_fp8, text_windows(DEMO, 128, 4))
    assert r["positions"] == 512
    assert r["top1_agreement"] >= 0.96
    assert r["max_abs_logit_error"] < 0.5
    assert r["mean_abs_logit_error"] < 0.04


def test_the_engine_serves_fp8_weights_and_its_tokens_are_the_fp8_model_s_own(demo_fp8):
    engine = Engine.from_model_dir(DEMO, config=EngineConfig(quantization="fp8", num_blocks=64, max_num_seqs=4,
                                                             max_num_batched_tokens=64, token_buckets=(4, 64)))
    assert engine.plan.labels()["layout"] == "fp8" and engine.plan.weights.quantization == "fp8"
    assert engine.plan.weights.linear == "xla"  # the CPU kernels do not read float8
    prompt = engine.tokenizer.encode(TEXT[:200], add_special_tokens=False)
    engine.add_request(prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), request_id="r")
    tokens = engine.run_to_completion()["r"][0].token_ids
    # Teacher-forced on the same weights without a KV cache, each drawn token is the argmax.
    logits = np.asarray(sequence_logits(demo_fp8.graphdef, demo_fp8.state, jnp.asarray([prompt + tokens])))[0]
    assert logits[len(prompt) - 1 : -1].argmax(-1).tolist() == tokens


@pytest.fixture(scope="module")
def cfg(checkpoint) -> ModelConfig:
    return ModelConfig.from_dir(checkpoint("llama"))


@pytest.mark.parametrize("config, devices, message", [
    (EngineConfig(quantization="fp8"), 2, "quantization 'fp8' quantizes the fused weights of one device; with "
                                          "tensor parallel 2 serve the model unquantized"),
    (EngineConfig(quantization="fp8", linear="cpu"), 1, "linear 'cpu' cannot read them: use --linear xla"),
    (EngineConfig(quantization="fp8", linear="packed"), 1, "linear 'packed' cannot read them"),
    (EngineConfig(quantization="int4"), 1, "quantization 'int4' is unknown; choose one of fp8 or leave it unset"),
])
def test_combinations_fp8_cannot_serve_are_refused_at_start_up(cfg, config, devices, message):
    with pytest.raises(BackendError, match=message):
        choose_plan(config, cfg, "bfloat16", make_mesh(devices))


def test_fp8_picks_xla_products_on_one_cpu_and_the_flag_refuses_other_schemes(cfg):
    plan = choose_plan(EngineConfig(quantization="fp8"), cfg, "bfloat16", make_mesh(1))
    assert plan.weights == WeightLayout("xla", fused=True, quantization="fp8")
    assert plan.labels()["layout"] == "fp8" and plan.labels()["linear"] == "xla"
    with pytest.raises(ValueError, match="fp8 weights are fused \\(one device\\) and read by XLA's products"):
        WeightLayout("cpu", fused=True, quantization="fp8")
    with pytest.raises(ValueError, match="quantization='awq' must be one of fp8"):
        ServerConfig.from_sources(None, {}, quantization="awq")
    assert ServerConfig.from_sources(None, {"TESSERA_QUANTIZATION": "fp8"}).engine_config().quantization == "fp8"
