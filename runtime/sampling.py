"""Token sampling on the device.

Order, as in vLLM: penalties on the raw logits, then temperature, min-p, top-k and top-p,
then one draw per row. Each row's random key is derived from its own seed and the position
it samples for, so a request's tokens do not depend on what else shares the batch.
Logprobs are those of the raw model distribution.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, UInt32

from kernels.logits_summary_cpu import logits_summary_cpu
from models.kv_cache import HostOrDevice

NUM_TOP_LOGPROBS = 20  # always computed; requests take the first N they asked for


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingInputs:
    temperature: Float[HostOrDevice, " rows"]  # 0 = greedy
    top_p: Float[HostOrDevice, " rows"]  # 1 = off
    top_k: Int[HostOrDevice, " rows"]  # 0 = off
    min_p: Float[HostOrDevice, " rows"]  # 0 = off
    seeds: UInt32[HostOrDevice, " rows"]
    positions: Int[HostOrDevice, " rows"]  # position of the token being drawn


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LogitAdjustments:
    """Only passed when a row in the batch uses penalties, min_tokens or a grammar."""

    output_counts: Int[Array, "rows vocab"]  # occurrences of each token in the output so far
    seen: Bool[Array, "rows vocab"]  # token occurs in the prompt or the output
    banned: Bool[Array, "rows vocab"]  # may not be drawn now (EOS before min_tokens)
    presence_penalty: Float[Array, " rows"]
    frequency_penalty: Float[Array, " rows"]
    repetition_penalty: Float[Array, " rows"]
    allowed: Int[Array, "rows words"]  # grammar masks: bit t % 32 of word t // 32 set = token t may come next


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampledTokens:
    tokens: Int[Array, " rows"]
    logprobs: Float[Array, " rows"]  # of the drawn token
    top_ids: Int[Array, "rows top"]
    top_logprobs: Float[Array, "rows top"]


def row_keys(seeds: UInt32[Array, " rows"], positions: Int[Array, " rows"]) -> jax.Array:
    """One PRNG key per row: fold the sampled position into the request's seed."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, positions)


def apply_adjustments(logits: Float[Array, "rows vocab"], adj: LogitAdjustments) -> Float[Array, "rows vocab"]:
    rep = adj.repetition_penalty[:, None]
    logits = jnp.where(adj.seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    counts = adj.output_counts.astype(logits.dtype)
    logits = logits - adj.frequency_penalty[:, None] * counts
    logits = logits - adj.presence_penalty[:, None] * (counts > 0)
    ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    allowed = (adj.allowed[:, ids // 32] >> (ids % 32)) & 1
    return jnp.where(adj.banned | (allowed == 0), -jnp.inf, logits)


def sample_tokens(
    logits: Float[Array, "rows vocab"], s: SamplingInputs, adj: LogitAdjustments | None = None,
    summary_impl: str = "xla",
) -> SampledTokens:
    """One token per row. `summary_impl` "cpu" takes the top logprobs and the normaliser from
    the CPU kernel (kernels/logits_summary_cpu.py), "xla" from lax.top_k and logsumexp."""
    raw = logits
    top_logits, top_ids, lse = _summary(logits, min(NUM_TOP_LOGPROBS, logits.shape[-1]), summary_impl)
    if adj is not None:
        logits = apply_adjustments(logits, adj)
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        greedy = top_ids[:, 0]  # the largest logit, the lowest id among equals, as argmax
    # Sorting the vocabulary is the costly part: skip it when every row is greedy.
    tokens = jax.lax.cond(jnp.all(s.temperature == 0), lambda: greedy, lambda: _draw(logits, s, greedy))
    chosen = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0] - lse
    return SampledTokens(tokens, chosen, top_ids, top_logits - lse[:, None])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptLogprobs:
    """Per token of the step: the logprob of the prompt token that follows it."""

    logprobs: Float[Array, " tokens"]  # of the target token (meaningless where the target is -1)
    ranks: Int[Array, " tokens"]  # 1 + tokens with a larger logit
    top_ids: Int[Array, "tokens top"]
    top_logprobs: Float[Array, "tokens top"]


def prompt_logprobs(logits: Float[Array, "tokens vocab"], targets: Int[Array, " tokens"],
                    summary_impl: str = "xla") -> PromptLogprobs:
    """Logprobs of each position's next prompt token (`targets`, -1 for none), from the logits
    the step computed for every position, normalised as the sampler's are (`_summary`)."""
    top_logits, top_ids, lse = _summary(logits, min(NUM_TOP_LOGPROBS, logits.shape[-1]), summary_impl)
    target_logits = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[:, None], axis=-1)
    ranks = jnp.sum(logits > target_logits, axis=-1, dtype=jnp.int32) + 1
    return PromptLogprobs(target_logits[:, 0] - lse, ranks, top_ids, top_logits - lse[:, None])


def _summary(logits: Float[Array, "rows vocab"], k: int, impl: str):
    """(k largest logits, their ids, log-sum-exp) per row: logprob = logit - lse, so the full
    log-softmax is never materialised."""
    if impl == "cpu":
        return logits_summary_cpu(logits, k)
    top_logits, top_ids = jax.lax.top_k(logits, k)
    return top_logits, top_ids.astype(jnp.int32), jax.nn.logsumexp(logits, axis=-1)


def _draw(logits: Float[Array, "rows vocab"], s: SamplingInputs, greedy: Int[Array, " rows"]) -> Int[Array, " rows"]:
    scaled = logits / jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    scaled = jax.lax.cond(
        jnp.any((s.top_p < 1) | (s.top_k > 0)), lambda: _truncate(scaled, s.top_k, s.top_p), lambda: scaled
    )
    probs = jax.nn.softmax(scaled, axis=-1)
    scaled = jnp.where(probs < s.min_p[:, None] * probs.max(axis=-1, keepdims=True), -jnp.inf, scaled)
    drawn = jax.vmap(jax.random.categorical)(row_keys(s.seeds, s.positions), scaled).astype(jnp.int32)
    return jnp.where(s.temperature > 0, drawn, greedy)


def _truncate(
    logits: Float[Array, "rows vocab"], top_k: Int[Array, " rows"], top_p: Float[Array, " rows"]
) -> Float[Array, "rows vocab"]:
    """Keep the top_k most likely tokens, then the smallest set of them reaching top_p."""
    vocab = logits.shape[-1]
    sorted_logits = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)
    sorted_logits = jnp.where(sorted_logits >= kth, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = (mass_before < top_p[:, None]) & (sorted_logits > -jnp.inf)
    threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)
