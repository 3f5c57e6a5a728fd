"""Build tiny random Hugging Face checkpoints with `transformers` itself, for tests.

Nothing can come from a model hub here, so every architecture Tessera serves is made
small and random by its own transformers class and written with `save_pretrained`, with
a tokenizer trained on the spot. The config can be rewritten in the transformers 4 layout
(`rope_theta`/`rope_scaling` at the top level) that published checkpoints use.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from tests.helpers.tiny_tokenizer import train_tiny_tokenizer

TOKENIZER_VOCAB = 512
MODEL_VOCAB = 520  # a few spare rows, as real checkpoints pad their embeddings

# Shapes chosen to cover every feature: GQA ratios 1, 2 and 4, explicit head_dim, tied
# embeddings, llama3 and linear RoPE scaling, a sliding window shorter than the prompts.
ARCHITECTURES: dict[str, dict] = {
    "llama": dict(
        cls="LlamaConfig",
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        rope_theta=500000.0,
    ),
    "mistral": dict(cls="MistralConfig", num_attention_heads=8, num_key_value_heads=2, sliding_window=12),
    "qwen2": dict(
        cls="Qwen2Config",
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "qwen3": dict(cls="Qwen3Config", num_attention_heads=4, num_key_value_heads=1, head_dim=32),
}
TOKENIZER_STYLE = {"llama": "llama3", "mistral": "llama3", "qwen2": "chatml", "qwen3": "chatml"}


def build_checkpoint(
    out_dir: Path,
    arch: str,
    *,
    layout: str = "v5",
    seed: int = 0,
    max_shard_size: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    **overrides,
) -> Path:
    """Write a random `arch` checkpoint (config, safetensors, tokenizer) into `out_dir`."""
    out_dir = Path(out_dir)
    spec = dict(ARCHITECTURES[arch])
    config_cls = getattr(transformers, spec.pop("cls"))
    rope_scaling = spec.pop("rope_scaling", None)
    rope_theta = spec.pop("rope_theta", 10000.0)
    params = dict(
        vocab_size=MODEL_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=256,
        initializer_range=0.1,  # peaked logits, so greedy choices are not near-ties
        bos_token_id=None,
        eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, **(rope_scaling or {})},
        **spec,
    )
    params.update(overrides)
    config = config_cls(**params)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch_dtype).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    train_tiny_tokenizer(out_dir, vocab_size=TOKENIZER_VOCAB, style=TOKENIZER_STYLE[arch])
    if layout == "v4":
        rewrite_config_v4(out_dir / "config.json")
    return out_dir


def rewrite_config_v4(path: Path) -> None:
    """Rewrite a transformers 5 config.json in the layout transformers 4 wrote."""
    raw = json.loads(path.read_text())
    rope = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type", "default")
    raw["rope_scaling"] = None if kind == "default" else {"rope_type": kind, **rope}
    raw.pop("layer_types", None)
    raw["transformers_version"] = "4.46.0"
    path.write_text(json.dumps(raw, indent=2))


def load_reference(model_dir: Path, torch_dtype: torch.dtype = torch.float32):
    """The same checkpoint loaded by transformers, as the numerical reference."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, attn_implementation="eager")
    return model.eval()


if __name__ == "__main__":
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/demo-model")
    build_checkpoint(out, sys.argv[2] if len(sys.argv) > 2 else "llama")
    print(f"wrote a random llama checkpoint to {out}")
