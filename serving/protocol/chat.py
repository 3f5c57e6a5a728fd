"""POST /v1/chat/completions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from serving.protocol.common import MAX_LOGPROBS, PositiveInt, PromptLogprob, RequestBody, SamplingFields, Usage

Role = Literal["system", "developer", "user", "assistant", "tool"]


class ContentPart(RequestBody, kw_only=True):
    type: str
    """Only "text" is served; the other kinds' fields are named so their refusal can say why."""
    text: str | None = None
    image_url: Any | None = None
    input_audio: Any | None = None
    file: Any | None = None
    refusal: str | None = None


class ChatMessage(RequestBody, kw_only=True):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    # What the openai client's own assistant message holds, so a conversation replayed from
    # `message.model_dump()` is accepted; none of them reaches the chat template.
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: Any | None = None
    function_call: Any | None = None
    reasoning_content: str | None = None
    """vLLM's reasoning text of an earlier turn; templates drop it, so does Tessera."""

    def unsupported(self) -> list[tuple[str, str]]:
        if self.audio is not None:
            return [("audio", "audio in messages is not supported")]
        if self.function_call is not None:
            return [("function_call", "function_call in messages is not supported; use tool_calls")]
        return []


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
    store: bool | None = None
    """OpenAI's stored completions: only false (or unset) is accepted, nothing is stored."""
    reasoning_effort: str | None = None
    """Not supported (no reasoning models are served)."""
    verbosity: str | None = None
    """Not supported."""

    def unsupported(self) -> list[tuple[str, str]]:
        found = [(name, f"{name} is not supported{hint}")
                 for name, hint in (("functions", "; use tools"), ("function_call", "; use tool_choice"),
                                    ("audio", ""), ("prediction", ""), ("web_search_options", ""))
                 if getattr(self, name) is not None]
        if self.modalities is not None and self.modalities != ["text"]:
            found.append(("modalities", 'modalities must be ["text"]'))
        if self.store:
            found.append(("store", "store=true is not supported: Tessera keeps no chat completions"))
        for name in ("reasoning_effort", "verbosity"):
            if getattr(self, name) is not None:
                found.append((name, f"{name} is not supported"))
        for i, message in enumerate(self.messages):
            found += [(f"messages[{i}].{param}", why) for param, why in message.unsupported()]
        return found


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
