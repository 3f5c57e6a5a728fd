"""config.json parsing: both layouts, each feature Tessera reads, each refusal naming its field,
and RoPE inverse frequencies equal to transformers'."""

import dataclasses
import json

import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from models.config import ConfigError, ModelConfig, RopeConfig
from models.rope import inverse_frequencies
from tests.helpers.tiny_checkpoint import ARCHITECTURES


def raw_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_both_layouts_give_the_same_config(checkpoint, arch):
    v4, v5 = checkpoint(arch, layout="v4"), checkpoint(arch)
    assert "rope_theta" in raw_config(v4) and "rope_parameters" not in raw_config(v4)
    assert "rope_parameters" in raw_config(v5) and "rope_theta" not in raw_config(v5)
    assert ModelConfig.from_dir(v4) == ModelConfig.from_dir(v5)


def test_legacy_rope_scaling_key_type(checkpoint):
    raw = raw_config(checkpoint("qwen2", layout="v4"))
    raw["rope_scaling"] = {"type": "linear", "factor": 2.0}  # written before rope_type existed
    assert ModelConfig.from_dict(raw).rope == RopeConfig(theta=10000.0, kind="linear", factor=2.0)


def test_llama3_rope_values(checkpoint):
    cfg = ModelConfig.from_dir(checkpoint("llama"))
    assert cfg.rope == RopeConfig(
        theta=500000.0, kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32,
    )


def test_linear_rope_values(checkpoint):
    assert ModelConfig.from_dir(checkpoint("qwen2")).rope == RopeConfig(theta=10000.0, kind="linear", factor=2.0)
    assert ModelConfig.from_dir(checkpoint("qwen3")).rope == RopeConfig(theta=10000.0)


def test_mistral_sliding_window_applies_to_every_layer(checkpoint):
    assert ModelConfig.from_dir(checkpoint("mistral")).layer_windows == (12, 12)
    assert ModelConfig.from_dir(checkpoint("mistral", sliding_window=None)).layer_windows == (None, None)


@pytest.mark.parametrize(
    ("fields", "windows"),
    [
        (dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), (None, 8, 8)),
        (dict(use_sliding_window=False, sliding_window=8, max_window_layers=1), (None, None, None)),
        # transformers' default max_window_layers is 28, not the layer count
        (dict(use_sliding_window=True, sliding_window=8, num_hidden_layers=30), (None,) * 28 + (8, 8)),
    ],
)
def test_qwen2_windows_from_use_sliding_window(checkpoint, fields, windows):
    raw = raw_config(checkpoint("qwen2", layout="v4"))
    raw.pop("max_window_layers")
    raw.update({"num_hidden_layers": 3, **fields})
    assert ModelConfig.from_dict(raw).layer_windows == windows
    hf = transformers.Qwen2Config(**{k: v for k, v in raw.items() if k != "rope_scaling"})
    assert [w is not None for w in windows] == [t == "sliding_attention" for t in hf.layer_types]


def test_qwen2_windows_from_layer_types(checkpoint):
    raw = raw_config(checkpoint("qwen2"))
    assert raw["layer_types"] == ["full_attention", "full_attention"]
    raw.update(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    assert ModelConfig.from_dict(raw).layer_windows == (8, None)


def test_head_dim_explicit_or_derived(checkpoint):
    raw = raw_config(checkpoint("qwen3"))
    assert ModelConfig.from_dict(raw).head_dim == 32  # hidden_size 64 / 4 heads would give 16
    raw.pop("head_dim")
    assert ModelConfig.from_dict(raw).head_dim == 16


@pytest.mark.parametrize(
    ("arch", "kv_heads", "group"), [("llama", 2, 2), ("mistral", 2, 4), ("qwen2", 4, 1), ("qwen3", 1, 4)]
)
def test_gqa_ratio(checkpoint, arch, kv_heads, group):
    cfg = ModelConfig.from_dir(checkpoint(arch))
    assert (cfg.num_kv_heads, cfg.kv_group_size) == (kv_heads, group)


def test_missing_kv_heads_means_one_per_query_head(checkpoint):
    raw = raw_config(checkpoint("mistral"))
    raw.pop("num_key_value_heads")
    cfg = ModelConfig.from_dict(raw)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.kv_group_size) == (8, 8, 1)


def test_tie_word_embeddings(checkpoint):
    assert ModelConfig.from_dir(checkpoint("qwen2")).tie_word_embeddings is True
    assert ModelConfig.from_dir(checkpoint("llama")).tie_word_embeddings is False
    raw = raw_config(checkpoint("qwen2"))
    raw.pop("tie_word_embeddings")
    assert ModelConfig.from_dict(raw).tie_word_embeddings is False  # Qwen2Config's default


REFUSALS = [
    ("llama", {"hidden_size": None}, "missing the field 'hidden_size'"),
    ("llama", {"num_attention_heads": None}, "missing the field 'num_attention_heads'"),
    ("llama", {"architectures": ["GPT2LMHeadModel"]}, "architectures='GPT2LMHeadModel' is not supported"),
    ("llama", {"architectures": None, "model_type": "gpt2"}, "model_type='gpt2' is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "rope_parameters.rope_type='yarn' is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, r"rope_parameters.factor=None"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}},
     "rope_parameters.low_freq_factor is required"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
    ("mistral", {"num_key_value_heads": 3},
     r"num_attention_heads \(8\) must be a multiple of num_key_value_heads \(3\)"),
    ("llama", {"num_key_value_heads": -2}, "num_key_value_heads=-2 must be a positive integer"),
    ("llama", {"num_key_value_heads": "2"}, "num_key_value_heads='2' must be a positive integer"),
    ("llama", {"hidden_size": "64"}, "hidden_size='64' must be a positive integer"),
    ("llama", {"num_hidden_layers": -2}, "num_hidden_layers=-2 must be a positive integer"),
    ("llama", {"intermediate_size": 128.5}, "intermediate_size=128.5 must be a positive integer"),
    ("llama", {"head_dim": 15}, "head_dim=15 must be a positive even integer"),
    ("llama", {"rms_norm_eps": "tiny"}, "rms_norm_eps='tiny' must be a number"),
    ("mistral", {"sliding_window": -12}, "sliding_window=-12 must be a positive integer"),
    ("qwen2", {"layer_types": ["full_attention"]}, "layer_types has 1 entries for 2 layers"),
    ("qwen2", {"layer_types": ["chunked_attention"] * 2}, "layer_types entry 'chunked_attention' is not supported"),
]


@pytest.mark.parametrize(("arch", "changes", "match"), REFUSALS, ids=[m for _, _, m in REFUSALS])
def test_refusal_names_the_field(checkpoint, arch, changes, match):
    raw = raw_config(checkpoint(arch))
    raw.update(changes)
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe garbage", b""])
def test_invalid_json_config(tmp_path, content):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        ModelConfig.from_dir(tmp_path)


def test_config_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config\.json must hold a JSON object"):
        ModelConfig.from_dir(tmp_path)


def test_missing_config_json(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json not found"):
        ModelConfig.from_dir(tmp_path)


# RoPE: the same inverse frequencies as transformers, from a transformers config object.
LLAMA31_ROPE = dict(
    rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
ROPE_CASES = {
    "default": (64, 4, dict(rope_type="default", rope_theta=10000.0)),
    "default-head128": (4096, 32, dict(rope_type="default", rope_theta=1000000.0)),
    "linear": (64, 4, dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
    "llama3-tiny": (64, 4, dict(ARCHITECTURES["llama"]["rope_scaling"], rope_theta=500000.0)),
    "llama3.1": (4096, 32, LLAMA31_ROPE),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_inverse_frequencies_match_transformers(case):
    hidden, heads, rope = ROPE_CASES[case]
    hf = transformers.LlamaConfig(
        hidden_size=hidden, num_attention_heads=heads, max_position_embeddings=131072, rope_parameters=rope
    )
    cfg = ModelConfig.from_dict(hf.to_dict())
    got = inverse_frequencies(cfg.rope, cfg.head_dim)
    if rope["rope_type"] == "default":
        want, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        want, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu")
    assert got.dtype == np.float32 and got.shape == (hidden // heads // 2,)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=0)


def test_llama3_scaling_keeps_short_stretches_long_blends_between():
    cfg = ModelConfig.from_dict(
        transformers.LlamaConfig(
            hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072, rope_parameters=LLAMA31_ROPE
        ).to_dict()
    )
    scaled = inverse_frequencies(cfg.rope, 128)
    plain = inverse_frequencies(dataclasses.replace(cfg.rope, kind="default"), 128)
    kept = np.isclose(scaled, plain, rtol=1e-6)
    stretched = np.isclose(scaled, plain / 8, rtol=1e-6)
    assert (kept.sum(), stretched.sum(), (~kept & ~stretched).sum()) == (29, 29, 6)
    assert kept[:29].all() and stretched[-29:].all()
