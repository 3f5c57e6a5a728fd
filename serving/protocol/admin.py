"""The small endpoints: models, tokenize, health, version, debug."""

from __future__ import annotations

from typing import Any, Literal

from msgspec import Struct

from serving.protocol.chat import ChatMessage
from serving.protocol.common import RequestBody


class ModelCard(Struct):
    id: str
    created: int
    root: str
    max_model_len: int
    object: Literal["model"] = "model"
    owned_by: str = "tessera"
    parent: str | None = None
    version: int | None = None
    """The base model: how many times it has been loaded (1, then +1 per hot reload)."""
    adapter_version: str | None = None
    """An adapter: the version new requests get (name@n; a replacement makes a new one)."""


class ModelList(Struct):
    data: list[ModelCard]
    object: Literal["list"] = "list"


class TokenizeRequest(RequestBody, kw_only=True):
    """vLLM's shape: exactly one of `prompt` and `messages`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    """For `prompt`; chat templates write their own special tokens."""
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class TokenizeResponse(Struct):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestBody, kw_only=True):
    tokens: list[int]
    model: str | None = None


class DetokenizeResponse(Struct):
    prompt: str


class HealthResponse(Struct, omit_defaults=True):
    status: str
    reason: str | None = None


class ReadyResponse(Struct):
    status: Literal["ready", "not ready"]
    model_loaded: bool
    engine_running: bool
    draining: bool
    requests_in_flight: int
    reason: str | None = None


class VersionResponse(Struct):
    version: str
    jax: str
    backend: str
    model: str


class RequestTimings(Struct):
    """One recent request, as /debug/requests shows it; times in seconds from its arrival."""

    request_id: str
    endpoint: str
    status: int
    model: str | None
    tenant: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reasons: list[str | None]
    arrival_unix: float
    ttft_s: float | None
    e2e_s: float | None
    mean_itl_s: float | None
    token_times_s: list[float]
    """When each output token reached the server's HTTP layer (first 512 tokens)."""
    prompt: str | None = None
    """Only with prompt logging on."""
    completion: str | None = None


class RecentRequests(Struct):
    requests: list[RequestTimings]
    capacity: int
