"""The execution plan: how this engine computes, decided once at load from the device, the
mesh and the config, then logged (one line) and exported (`tessera:execution_plan`).

The model is laid out by it (`models/loader.py` `lay_out`), the runner traces the plan's
attention and sampling, and nothing below asks again which device or weights it has.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
from jax.sharding import Mesh

from kernels.cpu_library import available as cpu_kernels_available
from models.config import ModelConfig
from models.projection import LINEAR_IMPLS, WeightLayout
from runtime.backend import resolve_attention_backend, resolve_linear, resolve_lora_kernel
from runtime.config import EngineConfig

__all__ = ["LINEAR_IMPLS", "ExecutionPlan", "choose_plan"]


@dataclass(frozen=True, slots=True)
class ExecutionPlan:
    platform: str
    """jax's kind of the mesh's devices: "cpu", "gpu"."""
    devices: int
    """Devices in the tensor-parallel mesh."""
    dtype: str
    """Weights, activations and KV cache."""
    attention: str
    """"pallas", "cpu", "reference" or "pallas_interpret" (runtime/backend.py)."""
    weights: WeightLayout
    """Linear implementation, fused projections and quantization; the weights' layout follows
    (models/projection.py): the `layout` label says "dense", "packed" or "fp8"."""
    sampling: str
    """Top logprobs and normaliser: "cpu" (the C++ kernel) or "xla"."""
    lora: str | None = None
    """LoRA products: "pallas", "xla" or "pallas_interpret"; None when no adapters are served."""

    def labels(self) -> dict[str, str]:
        """The labels of `tessera:execution_plan`, and the start-up log line's fields."""
        return {
            "device": self.platform, "tensor_parallel": str(self.devices), "dtype": self.dtype,
            "attention": self.attention, "linear": self.weights.linear, "fused": str(self.weights.fused).lower(),
            "layout": self.weights.name, "sampling": self.sampling,
        } | ({} if self.lora is None else {"lora": self.lora})

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.labels().items())


def choose_plan(config: EngineConfig, cfg: ModelConfig, dtype, mesh: Mesh) -> ExecutionPlan:
    """Raises BackendError naming a forced choice that this device or model cannot run."""
    platform, devices = mesh.devices.flat[0].platform, mesh.size
    attention = resolve_attention_backend(config.attention_backend, cfg, dtype, config.block_size, platform, devices)
    linear = resolve_linear(config.linear, cfg, dtype, platform, devices, config.quantization)
    # One device holds every weight whole, so q/k/v and gate/up can be one product each; on a
    # mesh they stay apart, split by heads and MLP columns.
    weights = WeightLayout(linear, fused=devices == 1, quantization=config.quantization)
    sampling = "cpu" if platform == "cpu" and devices == 1 and cpu_kernels_available() else "xla"
    lora = (resolve_lora_kernel(config.lora_kernel, cfg, config.max_lora_rank, dtype, platform, devices)
            if config.max_loras else None)
    return ExecutionPlan(platform, devices, jnp.dtype(dtype).name, attention, weights, sampling, lora)
