"""Bodies shared by the endpoints: errors, usage, stream options, the sampling fields."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta, Struct

MAX_LOGPROBS = 20  # the engine's top-N limit (runtime.request.MAX_LOGPROBS)
MAX_N = 16  # runtime.request.MAX_N

NonNegativeInt = Annotated[int, Meta(ge=0)]


class ErrorDetail(Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Struct):
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail


class PromptTokensDetails(Struct):
    cached_tokens: int = 0


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False
    """A last chunk with `usage` and no choices, before `[DONE]`."""
    continuous_usage_stats: bool = False
    """vLLM's: `usage` so far in every chunk."""


class SamplingFields(Struct, kw_only=True):
    """Fields common to /v1/completions and /v1/chat/completions: OpenAI's, then vLLM's extras."""

    model: str | None = None
    """The served model's name; optional, as in vLLM."""
    n: Annotated[int, Meta(ge=1, le=MAX_N)] = 1
    temperature: Annotated[float, Meta(ge=0)] | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    """Taken modulo 2**32."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    """Not supported: a non-empty map is refused."""
    # vLLM's extra sampling fields, sent by vLLM clients and benchmarks.
    top_k: int | None = None
    """0 or -1 disables it."""
    min_p: float | None = None
    min_tokens: NonNegativeInt = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    repetition_penalty: float | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = 0
    """Lower runs first."""
    cache_salt: str | None = None
    """Keeps this request's prefix-cache entries apart from other salts."""


def encode_json(value) -> bytes:
    return _ENCODER.encode(value)


_ENCODER = msgspec.json.Encoder()
