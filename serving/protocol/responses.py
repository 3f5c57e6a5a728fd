"""/v1/responses: OpenAI's Responses API (the request and the deletion; the response is built as a dict in
serving/routes/responses.py, in the shape the openai client reads)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from serving.protocol.common import MAX_TEMPERATURE, PositiveInt, ShortText


class ResponsesRequest(Struct, kw_only=True):
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


class ResponseDeleted(Struct):
    """DELETE /v1/responses/{id}'s answer, as OpenAI's."""

    id: str
    object: Literal["response"] = "response"
    deleted: bool = True
