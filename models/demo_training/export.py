"""Write trained parameters as a Hugging Face Llama checkpoint folder.

Every parameter goes back to its HF tensor through the same `models/weight_map.py` table the
loader reads with: the loader's transform (a reshape/transpose) is applied to an array of
element indices, which says where each HF element lands, and the inverse is a scatter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from models.config import ModelConfig
from models.weight_map import weight_source


def hf_config(cfg: ModelConfig, eos_token_ids: list[int], pad_token_id: int) -> dict:
    """config.json in the layout published Llama checkpoints use (transformers 4 and 5 read it)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope.theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": None,
        "eos_token_id": eos_token_ids,
        "pad_token_id": pad_token_id,
        "dtype": "float32",
    }


def to_hf_tensors(cfg: ModelConfig, state: nnx.State) -> dict[str, np.ndarray]:
    tensors = {}
    for path, var in nnx.to_flat_state(state):
        source = weight_source(cfg, tuple(path))
        value = np.asarray(var.get_value(), dtype=np.float32)
        where = source.to_model(np.arange(value.size).reshape(source.hf_shape))
        flat = np.empty(value.size, np.float32)
        flat[where.reshape(-1)] = value.reshape(-1)
        tensors[source.hf_name] = flat.reshape(source.hf_shape)
    return tensors


def export_checkpoint(
    out_dir: Path, cfg: ModelConfig, state: nnx.State, eos_token_ids: list[int], pad_token_id: int
) -> None:
    """config.json, generation_config.json and model.safetensors (float32) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf_config(cfg, eos_token_ids, pad_token_id), indent=2) + "\n")
    generation = {
        "bos_token_id": None,
        "eos_token_id": eos_token_ids,
        "pad_token_id": pad_token_id,
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.95,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(to_hf_tensors(cfg, state), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
