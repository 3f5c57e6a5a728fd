"""What the engine hands back after each step: the new part of each sample's output."""

from __future__ import annotations

from dataclasses import dataclass, field

from models.detokenizer import IncrementalDetokenizer
from models.tokenizer import Tokenizer
from runtime.request import Sequence


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the N most likely tokens at this position


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str  # new text since this sample's previous output
    token_ids: list[int]  # new tokens
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    num_generated_tokens: int = 0  # all samples, so far
    metrics: dict[str, float] = field(default_factory=dict)


class SequenceText:
    """Incremental text of one sample, with stop strings.

    Text that could be the start of a stop string is held back (the longest stop string's
    length minus one characters), so a stop string is never streamed before it is known
    to be one.
    """

    def __init__(self, tokenizer: Tokenizer, seq: Sequence):
        params = seq.request.params
        self.detok = IncrementalDetokenizer(tokenizer, seq.request.prompt_token_ids, params.skip_special_tokens)
        self.stops = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def add(self, token_id: int) -> tuple[str, str | None]:
        """(text to emit now, the stop string that ended the sample or None)."""
        self.pending += self.detok.add(token_id)
        found = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if found:
            at, stop = min(found)
            text = self.pending[: at + (len(stop) if self.include_stop else 0)]
            self.pending = ""
            return text, stop
        cut = max(len(self.pending) - self.hold, 0)
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text, None

    def finish(self) -> str:
        text, self.pending = self.pending + self.detok.flush(), ""
        return text
