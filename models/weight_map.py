"""Which Hugging Face tensor fills which model parameter, and how its layout changes.

HF stores a Linear as [out, in]; Tessera stores [in, *out] split per head, so the model is
einsum-shaped and its head axes can be sharded. Every transform here returns a numpy view
(reshape/transpose of a memory-mapped tensor), so nothing is copied until a device shard
is materialised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from models.config import ModelConfig

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class WeightSource:
    hf_name: str
    hf_shape: tuple[int, ...]
    to_model: Callable[[np.ndarray], np.ndarray]


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _transpose(w: np.ndarray) -> np.ndarray:
    return w.T


def _split_out_heads(heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    # [heads*head_dim, embed] -> [embed, heads, head_dim]
    return lambda w: w.reshape(heads, head_dim, -1).transpose(2, 0, 1)


def _split_in_heads(heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    # [embed, heads*head_dim] -> [heads, head_dim, embed]
    return lambda w: w.reshape(w.shape[0], heads, head_dim).transpose(1, 2, 0)


def _split_bias(heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda b: b.reshape(heads, head_dim)


def weight_source(cfg: ModelConfig, path: Path) -> WeightSource:
    """The HF tensor behind the parameter at `path` (an NNX state path of the checkpoint layout)."""
    e, m, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if path == ("embed_tokens",):
        return WeightSource("model.embed_tokens.weight", (v, e), _same)
    if path == ("lm_head", "weight"):  # untied; a tied head is the embedding itself
        return WeightSource("lm_head.weight", (v, e), _transpose)
    if path == ("norm", "weight"):
        return WeightSource("model.norm.weight", (e,), _same)
    if path[0] != "layers":
        raise KeyError(path)
    prefix = f"model.layers.{path[1]}."
    rest = path[2:]
    table: dict[Path, tuple[str, tuple[int, ...], Callable]] = {
        ("input_layernorm", "weight"): ("input_layernorm.weight", (e,), _same),
        ("post_attention_layernorm", "weight"): ("post_attention_layernorm.weight", (e,), _same),
        ("self_attn", "qkv", "q_proj", "weight"): ("self_attn.q_proj.weight", (h * d, e), _split_out_heads(h, d)),
        ("self_attn", "qkv", "k_proj", "weight"): ("self_attn.k_proj.weight", (k * d, e), _split_out_heads(k, d)),
        ("self_attn", "qkv", "v_proj", "weight"): ("self_attn.v_proj.weight", (k * d, e), _split_out_heads(k, d)),
        ("self_attn", "o_proj", "weight"): ("self_attn.o_proj.weight", (e, h * d), _split_in_heads(h, d)),
        ("self_attn", "q_bias"): ("self_attn.q_proj.bias", (h * d,), _split_bias(h, d)),
        ("self_attn", "k_bias"): ("self_attn.k_proj.bias", (k * d,), _split_bias(k, d)),
        ("self_attn", "v_bias"): ("self_attn.v_proj.bias", (k * d,), _split_bias(k, d)),
        ("self_attn", "o_bias"): ("self_attn.o_proj.bias", (e,), _same),
        ("self_attn", "q_norm", "weight"): ("self_attn.q_norm.weight", (d,), _same),
        ("self_attn", "k_norm", "weight"): ("self_attn.k_norm.weight", (d,), _same),
        ("mlp", "gate_proj", "weight"): ("mlp.gate_proj.weight", (m, e), _transpose),
        ("mlp", "up_proj", "weight"): ("mlp.up_proj.weight", (m, e), _transpose),
        ("mlp", "down_proj", "weight"): ("mlp.down_proj.weight", (e, m), _transpose),
        ("mlp", "gate_bias"): ("mlp.gate_proj.bias", (m,), _same),
        ("mlp", "up_bias"): ("mlp.up_proj.bias", (m,), _same),
        ("mlp", "down_bias"): ("mlp.down_proj.bias", (e,), _same),
    }
    name, shape, fn = table[rest]
    return WeightSource(prefix + name, shape, fn)


def ignorable(cfg: ModelConfig, hf_name: str) -> bool:
    """Tensors a checkpoint may carry that the model does not need."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return True  # old Llama 2 checkpoints saved the RoPE buffer
    return cfg.tie_word_embeddings and hf_name == "lm_head.weight"
