"""/v1/responses: OpenAI's Responses API (the request and the deletion; the response is built as a dict in
serving/routes/responses.py, in the shape the openai client reads)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from serving.protocol.common import MAX_TEMPERATURE, PositiveInt, RequestBody, ServiceTier, ShortText, StreamOptions


class ResponsesRequest(RequestBody, kw_only=True):
    input: str | Annotated[list[dict[str, Any]], Meta(min_length=1)]
    """A user message, or items: messages ({"role", "content"}), "function_call" and
    "function_call_output"."""
    model: ShortText | None = None
    instructions: str | None = None
    """A system message before the input (not carried to a later response through previous_response_id)."""
    max_output_tokens: PositiveInt | None = None
    temperature: Annotated[float, Meta(ge=0, le=MAX_TEMPERATURE)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    """Function tools only: {"type": "function", "name", "description", "parameters", "strict"}."""
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    """{"format": {"type": "text" | "json_object" | "json_schema", "name", "schema", "strict"}}."""
    previous_response_id: ShortText | None = None
    store: bool = True
    """Kept in this server's memory (bounded, per tenant) for previous_response_id; false: not kept."""
    metadata: dict[str, str] | None = None
    user: ShortText | None = None
    background: bool = False
    """Not supported."""
    reasoning: dict[str, Any] | None = None
    """Not supported."""
    top_logprobs: int | None = None
    """Not supported."""
    truncation: str | None = None
    """"disabled" only."""
    safety_identifier: ShortText | None = None
    service_tier: ServiceTier | None = None
    prompt_cache_key: ShortText | None = None
    """A routing hint for OpenAI's cache; Tessera's prefix cache needs none."""
    include: list[str] | None = None
    """Extra output data (encrypted reasoning, logprobs...): none is offered, so only an empty list."""
    stream_options: StreamOptions | None = None
    max_tool_calls: PositiveInt | None = None
    """Not supported."""
    conversation: Any | None = None
    """Not supported (OpenAI's server-side conversations); use previous_response_id."""
    prompt: Any | None = None
    """Not supported (OpenAI's stored prompt templates)."""

    def unsupported(self) -> list[tuple[str, str]]:
        found = [("background", "background responses are not supported")] if self.background else []
        if self.reasoning is not None:
            found.append(("reasoning", "reasoning options are not supported"))
        if self.top_logprobs is not None:
            found.append(("top_logprobs", "top_logprobs is not supported on /v1/responses"))
        if self.truncation not in (None, "disabled"):
            found.append(("truncation", 'truncation must be "disabled"'))
        found += [(name, f"{name} is not supported on /v1/responses{hint}")
                 for name, hint in (("max_tool_calls", ""), ("conversation", "; use previous_response_id"),
                                    ("prompt", " (stored prompt templates)"))
                 if getattr(self, name) is not None]
        if self.include:
            found.append(("include", "include is not supported: no extra output data is offered"))
        return found


class ResponseDeleted(Struct):
    """DELETE /v1/responses/{id}'s answer, as OpenAI's."""

    id: str
    object: Literal["response"] = "response"
    deleted: bool = True
