"""Which implementations the engine runs, chosen and checked once at start-up for the
execution plan (`runtime/execution_plan.py`).

Attention:
- `pallas`: the Pallas kernel lowered through Triton, for CUDA GPUs (the default there);
- `cpu`: the C++ kernel for CPUs (`kernels/cpu/`), compiled on first use with the machine's
  C++ compiler (the default on CPU when it builds; otherwise `reference`, with a warning);
- `reference`: the pure-jnp reference, which XLA compiles for any device;
- `pallas_interpret`: the kernel run by the Pallas interpreter on any device, for tests and
  debugging (slow).
Weight products (`models/linear.py`): `packed` for a bfloat16 model on one CPU whose weights
all pack, else `cpu` on one CPU, else `xla`; `xla` for fp8 weights (`--quantization fp8`,
`models/fp8.py`), which only XLA's products read, on one device (they are quantized fused).
LoRA products (when adapters are served, `models/lora.py`): `pallas` (the gathered kernels of
`kernels/lora_bgmv.py`, the default on GPUs whose shapes they take), `xla` (anywhere; the
default elsewhere), `pallas_interpret` (tests).
`EngineConfig.attention_backend`, `EngineConfig.linear` and `EngineConfig.lora_kernel` force a choice (the `--attention`
and `--linear` flags); one that cannot run on this device or model fails here, with a message
that says why, rather than at the first request.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.lora_bgmv import UnsupportedLoraShape
from kernels.lora_bgmv import check_supported as check_lora_supported
from kernels.ragged_paged_attention import UnsupportedAttentionShape, check_supported
from kernels.ragged_paged_attention_cpu import available as cpu_kernel_available
from models.config import ModelConfig
from models.lora import LORA_KERNELS, target_shapes
from models.projection import LINEAR_IMPLS, QUANTIZATIONS, packable

ATTENTION_BACKENDS = ("pallas", "cpu", "reference", "pallas_interpret")


class BackendError(ValueError):
    """A requested implementation (attention or weight products) cannot serve this model on this device."""


def resolve_attention_backend(requested: str | None, cfg: ModelConfig, kv_dtype, page_size: int,
                              platform: str | None = None, tensor_parallel: int = 1) -> str:
    platform = platform or jax.default_backend()
    choice = requested or ("pallas" if platform == "gpu" else ("cpu" if cpu_kernel_available() else "reference"))
    if choice not in ATTENTION_BACKENDS:
        raise BackendError(f"attention backend {choice!r} is unknown; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if choice == "pallas" and platform != "gpu":
        raise BackendError(
            f"attention backend 'pallas' needs a CUDA GPU, but jax's backend here is {platform!r}; "
            f"use 'reference' (or 'pallas_interpret' to run the kernel slowly in the interpreter)"
        )
    if choice == "cpu":
        if platform != "cpu":
            raise BackendError(f"attention backend 'cpu' runs on CPUs only, but jax's backend here is {platform!r}")
        if not cpu_kernel_available():
            raise BackendError("attention backend 'cpu' is unavailable: its C++ library did not build (see the "
                               "warning above; it needs g++); use 'reference'")
    if choice.startswith("pallas"):
        try:
            check_supported(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, page_size, kv_dtype)
        except UnsupportedAttentionShape as e:
            raise BackendError(f"attention backend {choice!r} cannot serve this model: {e}") from None
        if cfg.num_kv_heads % tensor_parallel:
            raise BackendError(
                f"attention backend {choice!r} with tensor parallel {tensor_parallel} needs the KV heads "
                f"({cfg.num_kv_heads}) split evenly over the devices; choose a tensor-parallel size that divides them"
            )
    return choice


def check_quantization(quantization: str | None, requested_linear: str | None, devices: int) -> None:
    """fp8 weights are made from the fused layout of one device and read only by XLA's products."""
    if quantization is None:
        return
    if quantization not in QUANTIZATIONS:
        raise BackendError(f"quantization {quantization!r} is unknown; choose one of {', '.join(QUANTIZATIONS)} "
                           f"or leave it unset")
    if devices > 1:
        raise BackendError(f"quantization {quantization!r} quantizes the fused weights of one device; with tensor "
                           f"parallel {devices} serve the model unquantized, or on one device")
    if requested_linear not in (None, "xla"):
        raise BackendError(f"quantization {quantization!r} weights are read by XLA's products only; linear "
                           f"{requested_linear!r} cannot read them: use --linear xla or leave it unset")


def resolve_linear(requested: str | None, cfg: ModelConfig, dtype, platform: str, devices: int,
                   quantization: str | None = None) -> str:
    """The weight products: the CPU kernels need one CPU device (on a mesh each weight is split
    by heads or MLP columns, which their fused weights would not follow) and their library;
    quantized weights are read by XLA (`check_quantization` refuses the rest)."""
    check_quantization(quantization, requested, devices)
    if quantization is not None:
        return "xla"
    on_one_cpu = platform == "cpu" and devices == 1
    if requested is None:
        if not (on_one_cpu and cpu_kernel_available()):
            return "xla"
        return "packed" if jnp.dtype(dtype) == jnp.bfloat16 and packable(cfg) else "cpu"
    if requested not in LINEAR_IMPLS:
        raise BackendError(f"linear {requested!r} is unknown; choose one of {', '.join(LINEAR_IMPLS)}")
    if requested == "xla":
        return requested
    if not on_one_cpu:
        raise BackendError(f"linear {requested!r} runs on one CPU device, but this mesh is {devices} x {platform!r}; "
                           f"use 'xla'")
    if not cpu_kernel_available():
        raise BackendError(f"linear {requested!r} is unavailable: the C++ library did not build (see the warning "
                           f"above; it needs g++); use 'xla'")
    if requested == "packed" and jnp.dtype(dtype) != jnp.bfloat16:
        raise BackendError(f"linear 'packed' packs bfloat16 weights, but the model is {jnp.dtype(dtype).name}; "
                           f"use --dtype bfloat16, or 'cpu'")
    if requested == "packed" and not packable(cfg):
        raise BackendError("linear 'packed' needs every projection's output width a multiple of 16 "
                           "(q/k/v, o, gate/up, down, vocabulary); use 'cpu'")
    return requested


def resolve_lora_kernel(requested: str | None, cfg: ModelConfig, max_rank: int, dtype, platform: str,
                        tensor_parallel: int = 1) -> str:
    """The LoRA product: the Pallas kernels on one GPU when every target's shapes suit them
    (otherwise XLA's masked product, which serves any shape), XLA elsewhere. On a mesh XLA
    splits the product with the weights; the kernels are not run per device (a gap)."""
    if requested is not None and requested not in LORA_KERNELS:
        raise BackendError(f"LoRA kernel {requested!r} is unknown; choose one of {', '.join(LORA_KERNELS)}")
    if requested == "pallas" and platform != "gpu":
        raise BackendError(f"LoRA kernel 'pallas' needs a CUDA GPU, but jax's backend here is {platform!r}; use 'xla' "
                           f"(or 'pallas_interpret' to run the kernels slowly in the interpreter)")
    if requested is not None and requested != "xla" and tensor_parallel > 1:
        raise BackendError(f"LoRA kernel {requested!r} runs on one device; with tensor parallel {tensor_parallel} "
                           f"use 'xla'")
    choice = requested or ("pallas" if platform == "gpu" and tensor_parallel == 1 else "xla")
    if choice.startswith("pallas"):
        try:
            for fan_in, fan_out in target_shapes(cfg).values():
                check_lora_supported(fan_in, fan_out, max_rank, dtype)
        except UnsupportedLoraShape as e:
            if requested is not None:
                raise BackendError(f"LoRA kernel {choice!r} cannot serve this model: {e}") from None
            return "xla"
    return choice


def backend_mode(platform: str, attention_backend: str) -> str:
    """The `backend` label of `tessera:backend_mode`: the device kind, with "cpu_xla" for a CPU
    whose C++ kernels are not in service (they did not build, or were switched off), so the
    fallback shows on a dashboard."""
    if platform != "cpu":
        return platform
    return "cpu" if attention_backend == "cpu" else "cpu_xla"


def runs_per_device(backend: str) -> bool:
    """Custom-call backends, which XLA cannot partition: with tensor parallelism each device
    runs them on its own KV heads under shard_map."""
    return backend in ("pallas", "pallas_interpret", "cpu")
