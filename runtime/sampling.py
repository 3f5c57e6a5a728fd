"""Token sampling on the device: greedy, temperature and nucleus (top-p).

Each row's random key is derived from its own seed and the position it samples for, so a
request's tokens do not depend on what else shares the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, UInt32


def row_keys(seeds: UInt32[Array, " rows"], positions: Int[Array, " rows"]) -> jax.Array:
    """One PRNG key per row: fold the sampled position into the request's seed."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, positions)


@jax.jit
def sample(
    logits: Float[Array, "rows vocab"],
    temperature: Float[Array, " rows"],
    top_p: Float[Array, " rows"],
    seeds: UInt32[Array, " rows"],
    positions: Int[Array, " rows"],
) -> Int[Array, " rows"]:
    """Temperature 0 means greedy; top_p 1 keeps the whole distribution."""
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    scaled = _keep_top_p(scaled, top_p)
    drawn = jax.vmap(jax.random.categorical)(row_keys(seeds, positions), scaled)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


def _keep_top_p(logits: Float[Array, "rows vocab"], top_p: Float[Array, " rows"]) -> Float[Array, "rows vocab"]:
    # Keep the smallest set of most likely tokens whose probability reaches top_p.
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p[:, None]
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)
