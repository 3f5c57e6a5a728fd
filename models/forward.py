"""The model's forward pass as a pure function of arrays: logits at chosen rows."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from models.kv_cache import AttentionMetadata, KVCache
from models.lora import LoraInputs


def compute_logits(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: Int[Array, " tokens"],
    positions: Int[Array, " tokens"],
    kv_cache: KVCache,
    md: AttentionMetadata,
    logits_indices: Int[Array, " rows"],
    lora: LoraInputs | None = None,
) -> tuple[Float[Array, "rows vocab"], KVCache]:
    """Logits (float32) of the tokens at `logits_indices`, and the updated cache. Traced
    inside the runner's step; `forward` is the same, jitted on its own."""
    model = nnx.merge(graphdef, state)
    hidden, kv_cache = model(tokens, positions, kv_cache, md, lora)
    return model.logits(hidden[logits_indices]), kv_cache


# The cache is donated: the caller must use the returned one and never the argument.
forward = partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("kv_cache",))(compute_logits)


def sequence_logits(
    graphdef: nnx.GraphDef, state: nnx.State, tokens: Int[Array, "batch seq"]
) -> Float[Array, "batch seq vocab"]:
    """Logits (float32) at every position of whole sequences, with no KV cache: the causal
    forward that training and perplexity use, on the same modules as serving."""
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)

    def one(seq):
        model = nnx.merge(graphdef, state)
        hidden, _ = model(seq, positions, None, None)
        return model.logits(hidden)

    return jax.vmap(one)(tokens)
