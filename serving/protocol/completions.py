"""POST /v1/completions."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

from serving.protocol.common import MAX_LOGPROBS, INT32_MAX, NonNegativeInt, PromptLogprob, SamplingFields, Usage

Prompt = str | list[str | int | list[int]]
"""Text, token ids, a list of texts or a list of token-id lists (ids are checked against the vocabulary)."""


class CompletionRequest(SamplingFields, kw_only=True):
    prompt: Prompt
    max_tokens: NonNegativeInt | None = None
    """Default 16, as OpenAI's; 0 only with echo (the prompt alone, with its logprobs)."""
    logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    """Log probabilities of the chosen token and this many alternatives."""
    echo: bool = False
    """The prompt before the completion; with logprobs, the prompt tokens' logprobs too (the first null)."""
    best_of: Annotated[int, Meta(ge=1, le=INT32_MAX)] | None = None
    """Only equal to n (or unset) is accepted."""
    suffix: str | None = None
    """Not supported."""

    def unsupported(self) -> list[tuple[str, str]]:
        found = [("suffix", "suffix is not supported")] if self.suffix else []
        if self.best_of is not None and self.best_of != self.n:
            found.append(("best_of", "best_of must equal n (or be left out): Tessera does not rank samples"))
        return found


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None
    """vLLM's: the stop token id or stop string that ended the choice."""
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None
    """vLLM's, when asked for: per prompt token, its logprob and the top alternatives, by token id."""


class CompletionResponse(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    object: Literal["text_completion"] = "text_completion"


class CompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: Literal["text_completion"] = "text_completion"
