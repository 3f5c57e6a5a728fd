"""Engine settings, checked once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.kv_tiers import KvTierConfig


@dataclass(slots=True)
class EngineConfig:
    block_size: int = 16
    """Tokens per KV cache page."""
    num_blocks: int | None = None
    """KV cache pages; None sizes the pool from kv_cache_memory_bytes."""
    kv_cache_memory_bytes: int = 2 * 2**30
    """Memory for the KV cache when num_blocks is not given (and the device's memory is not, below)."""
    gpu_memory_utilization: float | None = None
    """vLLM's meaning: the fraction of the device's memory for weights, activations and KV cache.
    Set, on a device that reports its memory (GPUs), the KV cache takes what is left of that
    fraction after the weights and the largest step's workspace (runtime/kv_memory.py); a device
    that does not (the CPU) keeps kv_cache_memory_bytes. num_blocks wins over both."""
    max_num_seqs: int = 16
    """Sequences in one step, at most (also the fixed row count of the sampling batch)."""
    max_num_batched_tokens: int = 512
    """Token budget of one step: decodes plus prefill chunks."""
    max_model_len: int | None = None
    """Prompt plus output tokens per sequence; None = the model's max_position_embeddings."""
    enable_chunked_prefill: bool = True
    """Split long prompts across steps, mixed with other sequences' decodes."""
    enable_prefix_caching: bool = True
    """Reuse KV pages of prompt prefixes seen before."""
    async_scheduling: bool = True
    """Plan and dispatch step N+1 before reading step N back (runtime/engine.py); off runs steps in series."""
    max_kv_events: int = 10_000
    """KV cache events the block manager keeps until a consumer takes them; the oldest are dropped beyond."""
    token_buckets: tuple[int, ...] | None = None
    """Padded token counts the step compiles for; None = powers of two up to the budget."""
    model_id: str = ""
    """Part of every prefix-cache key, so two models never share pages."""
    attention_backend: str | None = None
    """"pallas", "cpu", "reference" or "pallas_interpret"; None = by device (runtime/backend.py)."""
    linear: str | None = None
    """Weight products: "xla", "cpu" or "packed"; None = by device, dtype and shapes (runtime/backend.py)."""
    quantization: str | None = None
    """"fp8": the layers' weights quantized to float8 e4m3 at load, a scale per output channel
    (models/fp8.py); None serves them in the model's dtype."""
    max_loras: int = 0
    """LoRA adapters on the device at once (slots of the step); 0 serves no adapters."""
    max_lora_rank: int = 16
    """The largest adapter rank taken; every slot is this wide."""
    lora_kernel: str | None = None
    """LoRA products: "pallas", "xla" or "pallas_interpret"; None = by device (runtime/backend.py)."""
    kv_tiers: KvTierConfig | None = None
    """Host memory and disk tiers below the device's prefix cache (runtime/kv_tiers.py); None = device only."""

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_loras < 0 or self.max_lora_rank < 1:
            raise ValueError(f"max_loras={self.max_loras} must be >= 0 and max_lora_rank={self.max_lora_rank} >= 1")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks={self.num_blocks} must be >= 1")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= max_num_seqs={self.max_num_seqs}"
            )

    def resolved_token_buckets(self) -> tuple[int, ...]:
        if self.token_buckets:
            buckets = tuple(sorted(set(self.token_buckets)))
            if buckets[-1] < self.max_num_batched_tokens:
                raise ValueError(f"the largest token bucket must be >= max_num_batched_tokens={self.max_num_batched_tokens}")
            return buckets
        buckets, b = [], 1
        while b < self.max_num_batched_tokens:
            buckets.append(b)
            b *= 2
        return (*buckets, self.max_num_batched_tokens)
