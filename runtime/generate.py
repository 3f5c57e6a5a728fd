"""One prompt at a time through the model: prefill, then one decode step per token.

The batched engine (continuous batching, paged KV shared by many requests) replaces this
for serving; this is what `tessera generate` runs for a single prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from models.forward import forward
from models.kv_cache import AttentionMetadata
from models.loader import LoadedModel
from runtime.sampling import sample

PAGE_SIZE = 16
MIN_PREFILL_BUCKET = 16


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be at least 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must not be negative")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


def generate_ids(
    model: LoadedModel, prompt_ids: list[int], params: SamplingParams, eos_ids: frozenset[int] = frozenset()
) -> Iterator[int]:
    """Yield generated token ids until max_tokens or an EOS id (which is yielded too)."""
    cfg = model.cfg
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    total = len(prompt_ids) + params.max_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
            f"context of {cfg.max_position_embeddings} tokens"
        )
    num_pages = -(-total // PAGE_SIZE)
    cache = model.allocate_kv_cache(num_pages, PAGE_SIZE)
    block_table = jnp.arange(num_pages, dtype=jnp.int32)[None]

    def step(tokens: list[int], start: int, bucket: int):
        nonlocal cache
        n = len(tokens)
        pad = bucket - n
        md = AttentionMetadata(
            slot_mapping=jnp.asarray(list(range(start, start + n)) + [-1] * pad, jnp.int32),
            block_tables=block_table,
            context_lens=jnp.asarray([start + n], jnp.int32),
            query_start_loc=jnp.asarray([0, n], jnp.int32),
        )
        ids = jnp.asarray(tokens + [0] * pad, jnp.int32)
        positions = jnp.asarray(list(range(start, start + n)) + [0] * pad, jnp.int32)
        logits, cache = forward(model.graphdef, model.state, ids, positions, cache, md, jnp.asarray([n - 1]))
        token = sample(
            logits,
            jnp.asarray([params.temperature], jnp.float32),
            jnp.asarray([params.top_p], jnp.float32),
            jnp.asarray([params.seed], jnp.uint32),
            jnp.asarray([start + n], jnp.int32),
        )
        return int(np.asarray(token)[0])

    token = step(list(prompt_ids), 0, prefill_bucket(len(prompt_ids)))
    for produced in range(1, params.max_tokens + 1):
        yield token
        if (token in eos_ids and not params.ignore_eos) or produced == params.max_tokens:
            return
        token = step([token], len(prompt_ids) + produced - 1, 1)


def prefill_bucket(n: int) -> int:
    """Pad prompt lengths to powers of two so only a few shapes ever compile."""
    bucket = MIN_PREFILL_BUCKET
    while bucket < n:
        bucket *= 2
    return bucket
