"""What the engine hands back after each step: the new part of each sample's output."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from models.detokenizer import IncrementalDetokenizer
from models.tokenizer import Tokenizer
from runtime.request import Sequence


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the N most likely tokens at this position
    rank: int | None = None  # 1 + tokens more likely than this one (prompt logprobs, as vLLM)


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str  # new text since this sample's previous output
    token_ids: list[int]  # new tokens
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class RequestTimings:
    """When a request reached each stage, as `time.monotonic()` seconds (None until known).

    One clock inside the engine: monotonic, so a wall-clock step (NTP) never makes a negative
    latency; the API edge converts with `to_wall_clock()` where it needs dates (trace spans).
    Filled by the engine; final once the request's output has finished=True. `token_times`
    holds one entry per step that gave the request new tokens (with n > 1 samples, one entry
    for all samples of that step), so its gaps are the inter-token latencies a stream sees.
    """

    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    num_generation_tokens: int = 0  # all samples
    num_preemptions: int = 0  # all samples
    token_times: list[float] = field(default_factory=list)
    detokenize_seconds: float = 0.0  # spent in incremental detokenization and stop-string search
    finished_reason: str | None = None  # sample 0's: "stop", "length" or "abort"

    def to_wall_clock(self) -> RequestTimings:
        """A copy with every time as `time.time()` seconds (durations are unchanged)."""
        shift = time.time() - time.monotonic()
        moved = {name: getattr(self, name) for name in _INSTANTS}
        return dataclasses.replace(
            self, **{name: None if t is None else t + shift for name, t in moved.items()},
            token_times=[t + shift for t in self.token_times],
        )

    @property
    def queue_seconds(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft_seconds(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_seconds(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    @property
    def prefill_seconds(self) -> float | None:
        if self.first_scheduled_time is None or self.first_token_time is None:
            return None
        return self.first_token_time - self.first_scheduled_time

    @property
    def decode_seconds(self) -> float | None:
        if self.first_token_time is None or self.last_token_time is None:
            return None
        return self.last_token_time - self.first_token_time

    @property
    def inter_token_seconds(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


_INSTANTS = ("arrival_time", "first_scheduled_time", "first_token_time", "last_token_time", "finished_time")


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    num_generated_tokens: int = 0  # all samples, so far
    metrics: dict[str, float] = field(default_factory=dict)
    timings: RequestTimings = field(default_factory=RequestTimings)
    error: str | None = None  # set (with finished=True) when the step computing the request failed
    # Once, with sample 0's first token, when params.prompt_logprobs was asked: one entry per
    # prompt token, the first None (nothing predicts it).
    prompt_logprobs: list[TokenLogprob | None] | None = None


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
