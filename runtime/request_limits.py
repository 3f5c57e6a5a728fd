"""What a request must fit, as plain numbers, and the one check of a request against them.

An engine's limits (context, vocabulary, cache pages, batch) travel to a remote client in the
worker's handshake, so a gateway refuses a bad request with the same message the engine would,
before anything is queued or a stream has begun. The messages are `Engine.make_request`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.request import SamplingParams


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_model_len: int
    vocab_size: int
    num_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool
    eos_token_ids: frozenset[int] = frozenset()  # the model's end tokens (tokenizer and config)


def check_request(ids: list[int], params: SamplingParams, limits: RequestLimits) -> None:
    """Raises ValueError naming the field that does not fit."""
    vocab = limits.vocab_size
    if not ids:
        raise ValueError("prompt is empty")
    if len(ids) >= limits.max_model_len:  # before the per-token scan: a huge prompt costs one len()
        raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {limits.max_model_len} tokens")
    if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
        raise ValueError(f"prompt holds token ids outside the vocabulary [0, {vocab})")
    if len(ids) + params.max_tokens > limits.max_model_len:
        raise ValueError(
            f"max_tokens={params.max_tokens} is too large: the prompt has {len(ids)} tokens and the "
            f"model's context is {limits.max_model_len} tokens"
        )
    bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"stop_token_ids={bad} are outside the vocabulary [0, {vocab})")
    if params.n > limits.max_num_seqs:
        raise ValueError(f"n={params.n} is larger than max_num_seqs={limits.max_num_seqs}")
    pages = -(-(len(ids) + params.max_tokens) // limits.block_size)
    if pages > limits.num_blocks:
        raise ValueError(f"prompt plus max_tokens needs {pages} KV cache pages; the cache has {limits.num_blocks}")
    if not limits.enable_chunked_prefill and len(ids) > limits.max_num_batched_tokens:
        raise ValueError(
            f"prompt has {len(ids)} tokens, more than max_num_batched_tokens={limits.max_num_batched_tokens} "
            "with chunked prefill off"
        )
