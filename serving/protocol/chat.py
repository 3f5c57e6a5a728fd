"""POST /v1/chat/completions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from serving.protocol.common import MAX_LOGPROBS, PositiveInt, PromptLogprob, SamplingFields, Usage

Role = Literal["system", "developer", "user", "assistant", "tool"]


class ContentPart(Struct, kw_only=True):
    type: str
    """Only "text" is served."""
    text: str | None = None


class ChatMessage(Struct, kw_only=True):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_tokens: PositiveInt | None = None
    """Deprecated by OpenAI in favour of max_completion_tokens; default: the rest of the context."""
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    """Alternatives per token; needs logprobs=true."""
    tools: list[dict[str, Any]] | None = None
    """Functions the model may call: [{"type": "function", "function": {"name", "description", "parameters"}}]."""
    tool_choice: str | dict[str, Any] | None = None
    """"none", "auto" (the default with tools), "required" or {"type": "function", "function": {"name"}}."""
    parallel_tool_calls: bool | None = None
    """With "required": whether several calls may come (default true)."""
    # OpenAI fields Tessera does not serve: named in a 400 rather than ignored.
    functions: list[Any] | None = None
    """Not supported (the legacy form of tools)."""
    function_call: Any | None = None
    """Not supported (the legacy form of tool_choice)."""
    audio: Any | None = None
    """Not supported."""
    modalities: list[str] | None = None
    """["text"] only."""
    prediction: Any | None = None
    """Not supported."""
    web_search_options: Any | None = None
    """Not supported."""
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    """Extra variables for the chat template."""


class ChatLogprobTop(Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatLogprobToken(Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[ChatLogprobTop]


class ChatLogprobs(Struct):
    content: list[ChatLogprobToken] | None


class ChatResponseMessage(Struct):
    content: str | None
    role: Literal["assistant"] = "assistant"
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(Struct):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort", "tool_calls"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None
    """vLLM's, when asked for: the rendered prompt's tokens (streamed: on one chunk)."""


class ChatDelta(Struct, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort", "tool_calls"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"


class ChatCompletionPromptChunk(ChatCompletionChunk, kw_only=True):
    """The one chunk of a stream that carries vLLM's `prompt_logprobs` (the first one after the
    prompt is computed), so that the other chunks do not each carry a null field."""

    prompt_logprobs: list[dict[str, PromptLogprob] | None]
