"""Random PEFT LoRA adapters for the tiny checkpoints, written by peft itself."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.tiny_checkpoint import load_reference


def build_adapter(model_dir: Path, out_dir: Path, *, rank: int, targets: tuple[str, ...], alpha: float = 16.0,
                  rslora: bool = False, seed: int = 0, **config) -> Path:
    """A LoRA adapter of `model_dir` with random A and B (peft's default B is zero, which would
    change nothing), saved with `save_pretrained`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = load_reference(model_dir)
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora,
                      init_lora_weights=False, lora_dropout=0.0, **config)
    model = get_peft_model(base, lora)
    with torch.no_grad():  # large enough to move greedy choices of a tiny random model
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.1)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def load_peft_reference(model_dir: Path, adapters: dict[str, Path]):
    """transformers + peft with every adapter loaded under its name."""
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(load_reference(model_dir), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()
