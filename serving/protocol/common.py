"""Bodies shared by the endpoints: errors, usage, stream options, the sampling fields."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

MAX_LOGPROBS = 20  # the engine's top-N limit (runtime.request.MAX_LOGPROBS)
MAX_N = 16  # runtime.request.MAX_N
MAX_STOP_STRINGS = 16  # runtime.request.MAX_STOP_STRINGS
MAX_STOP_CHARS = 1024  # text this long is held back from a stream until it is known not to be a stop
MAX_STOP_TOKEN_IDS = 1024
MAX_TEXT_FIELD = 1024  # `user`, `cache_salt`: names, not content
MAX_TEMPERATURE = 100.0  # beyond it the distribution is flat to float32's precision anyway
INT32_MAX = 2**31 - 1  # the engine's arrays hold counts and ids as int32
MIN_REPETITION_PENALTY = 0.01  # runtime.request.MIN_REPETITION_PENALTY

# Every field is bounded here, at the API edge, so a value the engine's arrays cannot hold is a
# 400 naming the field; the engine checks again per request (runtime/request.py).
NonNegativeInt = Annotated[int, Meta(ge=0, le=INT32_MAX)]
PositiveInt = Annotated[int, Meta(ge=1, le=INT32_MAX)]
TokenId = Annotated[int, Meta(ge=0, le=INT32_MAX)]
StopString = Annotated[str, Meta(min_length=1, max_length=MAX_STOP_CHARS)]
ShortText = Annotated[str, Meta(max_length=MAX_TEXT_FIELD)]


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


class RequestBody(Struct, kw_only=True, forbid_unknown_fields=True):
    """An API request body: a field Tessera does not know is a 400 naming it, never ignored.

    Fields it knows but serves only in part say so in `unsupported()`, which the body reader
    (serving/body.py) calls after decoding: [(param, why)], the first one answered as a 400."""

    def unsupported(self) -> list[tuple[str, str]]:
        return []


class StreamOptions(RequestBody, kw_only=True):
    include_usage: bool = False
    """A last chunk with `usage` and no choices, before `[DONE]`."""
    continuous_usage_stats: bool = False
    """vLLM's: `usage` so far in every chunk."""
    include_obfuscation: bool | None = None
    """OpenAI's padding of stream events against length side channels; accepted, not added."""


ServiceTier = Literal["auto", "default"]
"""OpenAI's processing tiers; Tessera has one, so only the two names that mean "the usual"."""


class OpenAIRequestFields(RequestBody, kw_only=True):
    """OpenAI request fields that name or tag a request and change nothing in what is generated.

    Accepted so that clients and agent frameworks that send them work; none is stored."""

    user: ShortText | None = None
    safety_identifier: ShortText | None = None
    """OpenAI's successor of `user`."""
    metadata: dict[str, str] | None = None
    """Tags for OpenAI's stored completions; nothing is stored here."""
    service_tier: ServiceTier | None = None
    prompt_cache_key: ShortText | None = None
    """A routing hint for OpenAI's cache; Tessera's prefix cache needs none."""


class SamplingFields(OpenAIRequestFields, kw_only=True):
    """Fields common to /v1/completions and /v1/chat/completions: OpenAI's, then vLLM's extras."""

    model: ShortText | None = None
    """The served model's name; optional, as in vLLM."""
    n: Annotated[int, Meta(ge=1, le=MAX_N)] = 1
    temperature: Annotated[float, Meta(ge=0, le=MAX_TEMPERATURE)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    stop: StopString | Annotated[list[StopString], Meta(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    """An int64 (OpenAI's type), taken modulo 2**32."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Meta(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Meta(ge=-2, le=2)] = 0.0
    logit_bias: dict[str, float] | None = None
    """Not supported: a non-empty map is refused."""
    # vLLM's extra sampling fields, sent by vLLM clients and benchmarks.
    top_k: Annotated[int, Meta(ge=-1, le=INT32_MAX)] | None = None
    """0 or -1 disables it."""
    min_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    min_tokens: NonNegativeInt = 0
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    repetition_penalty: Annotated[float, Meta(ge=MIN_REPETITION_PENALTY, le=2)] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: Annotated[int, Meta(ge=-INT32_MAX - 1, le=INT32_MAX)] = 0
    """Lower runs first."""
    cache_salt: ShortText | None = None
    """Keeps this request's prefix-cache entries apart from other salts."""
    prompt_logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    """vLLM's: each prompt token's logprob and this many alternatives (the first token's is null).
    Such a prompt is computed in full: the prefix cache holds no logits."""
    # Structured output (serving/structured.py): at most one of these.
    response_format: dict[str, Any] | None = None
    """OpenAI's: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema":
    {"name", "schema", "strict"}}."""
    structured_outputs: dict[str, Any] | None = None
    """vLLM's: one of {"json": schema}, {"regex": ...}, {"choice": [...]}, {"grammar": Lark or GBNF},
    {"json_object": true}."""
    guided_json: dict[str, Any] | str | None = None
    """vLLM's older field: a JSON schema."""
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    """Lark or GBNF."""
    guided_whitespace_pattern: str | None = None
    """Not supported: JSON output is compact."""


class PromptLogprob(Struct):
    """vLLM's entry of `prompt_logprobs`, keyed by token id."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def encode_json(value) -> bytes:
    return _ENCODER.encode(value)


_ENCODER = msgspec.json.Encoder()
