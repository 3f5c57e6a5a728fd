"""Requests, their sampling parameters, and the sequences the scheduler moves around.

A request with `n` samples owns `n` sequences. Sample 0 prefills the prompt first; the
others wait until it has, then find the prompt's full blocks in the prefix cache, so the
prompt is computed once and its blocks shared (see `Scheduler`).
"""

from __future__ import annotations

import enum
import itertools
import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from runtime.structured import GuidedDecoding

if TYPE_CHECKING:
    from runtime.structured import SequenceGrammar

MAX_LOGPROBS = 20
MAX_N = 16
MAX_STOP_STRINGS = 16
# What the step's arrays hold: int32 for counts and ids, float32 for the sampling floats.
INT32_MAX = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38
MIN_REPETITION_PENALTY = 0.01  # positive logits are divided by it: a smaller one overflows float32 to inf
PENDING_TOKEN = -1  # a drawn token still on the device (overlapped scheduling); never a vocabulary id
SAMPLING_EPS = 1e-5  # temperatures below this are greedy (vLLM's rule): 1/T would overflow float32 logits


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None  # None: drawn once at random, so the request is still reproducible from its outputs
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # top-N alternatives per generated token, N <= 20
    prompt_logprobs: int | None = None  # top-N alternatives per prompt token (vLLM's field), computed at prefill
    n: int = 1
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    guided: GuidedDecoding | None = None  # structured output: what the text must match (runtime/structured.py)

    def __post_init__(self):
        """Every value must fit the step's arrays (int32, float32): a value that does not is this
        request's ValueError, never a fault of the step that would carry it. NaN fails every
        range check below, as it compares false."""
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", self.max_tokens, "must be an integer >= 1")
        _check(_is_real(self.temperature) and 0 <= self.temperature <= FLOAT32_MAX, "temperature", self.temperature,
               "must be >= 0 and finite")
        _check(_is_real(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        _check(_is_int(self.top_k) and 0 <= self.top_k <= INT32_MAX, "top_k", self.top_k,
               f"must be an integer in [0, {INT32_MAX}] (0 disables it)")
        _check(_is_real(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "must be in [0, 1]")
        _check(_is_real(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty",
               self.presence_penalty, "must be in [-2, 2]")
        _check(_is_real(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
               self.frequency_penalty, "must be in [-2, 2]")
        _check(_is_real(self.repetition_penalty) and MIN_REPETITION_PENALTY <= self.repetition_penalty <= 2,
               "repetition_penalty", self.repetition_penalty, f"must be in [{MIN_REPETITION_PENALTY}, 2]")
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", self.n, f"must be an integer in [1, {MAX_N}]")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
               "must be in [0, max_tokens]")
        if self.logprobs is not None:
            _check(_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", self.logprobs,
                   f"must be in [0, {MAX_LOGPROBS}]")
        if self.prompt_logprobs is not None:
            _check(_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS, "prompt_logprobs",
                   self.prompt_logprobs, f"must be in [0, {MAX_LOGPROBS}]")
        _check(isinstance(self.stop, (tuple, list)) and all(isinstance(s, str) and s for s in self.stop), "stop",
               self.stop, "must be a sequence of non-empty strings")
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop", len(self.stop), f"at most {MAX_STOP_STRINGS} stop strings")
        _check(isinstance(self.stop_token_ids, (tuple, list))
               and all(_is_int(t) and 0 <= t <= INT32_MAX for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, f"must be a sequence of integers in [0, {INT32_MAX}]")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "must be true or false")
        _check(self.guided is None or isinstance(self.guided, GuidedDecoding), "guided", self.guided,
               "must be a GuidedDecoding")
        if self.seed is not None:
            _check(_is_int(self.seed) and 0 <= self.seed < 2**32, "seed", self.seed, "must be an integer in [0, 2**32)")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def needs_logit_adjustment(self) -> bool:
        """Penalties, min_tokens or a grammar: the step must be given per-row token counts, bans
        and masks, computed from every drawn token (so those are read back before the next step)."""
        return (
            self.guided is not None
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1
            or self.min_tokens > 0
        )


def _check(ok: bool, field_name: str, value, rule: str) -> None:
    if not ok:
        raise ValueError(f"{field_name}={_shown(value)} {rule}")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."  # a huge list is named, not echoed


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue, its blocks freed, to be recomputed
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"
    ERROR = "error"  # the engine step computing it failed (runtime/faults.py)


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One sample of a request: the token ids so far and where they live in the cache.

    With overlapped scheduling the last token may be PENDING_TOKEN: drawn by a step whose
    result is still on the device. The scheduler plans with it (it is the next step's input)
    and the engine writes the value in once the step is read back.
    """

    request: Request
    index: int  # sample number within the request
    token_ids: list[int]
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache, or being written by a dispatched step
    num_written_tokens: int = 0  # of those, written by a step already read back (what the prefix cache may share)
    num_pending_tokens: int = 0  # trailing PENDING_TOKEN entries of token_ids (0 or 1)
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache at admission
    block_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_preemptions: int = 0
    grammar: SequenceGrammar | None = None  # structured output's state, advanced by each drawn token

    @property
    def num_prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        """Tokens including a pending one: the length the next step computes at."""
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """The drawn tokens known on the host."""
        return self.token_ids[self.num_prompt_tokens : len(self.token_ids) - self.num_pending_tokens]

    @property
    def num_output_tokens(self) -> int:
        """Drawn tokens known on the host (a pending one not counted)."""
        return len(self.token_ids) - self.num_prompt_tokens - self.num_pending_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def needs_prompt_logits(self) -> bool:
        """Whether computing this sample's prompt must also give the prompt's logprobs: sample 0 of
        a request that asked for them, before its first token. A cached prefix has no logits, so
        such a prompt is computed in full (the scheduler skips the prefix cache for it)."""
        return (self.index == 0 and self.request.params.prompt_logprobs is not None
                and self.num_tokens == self.num_prompt_tokens)

    @property
    def seed(self) -> int:
        # Each sample gets its own stream from the request's seed.
        return (self.request.seed + self.index * 0x9E3779B1) % 2**32

    @property
    def priority_key(self) -> tuple[int, float, int]:
        """Smaller runs first: priority, then arrival, then sample order."""
        return (self.request.priority, self.request.arrival_time, self.index)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0  # lower runs first, as in vLLM
    tenant: str = "default"
    cache_salt: str = ""  # isolates this request's prefix-cache entries from other salts
    adapter_id: str = ""
    trace_id: str = ""  # the caller's id for logs and audit lines (the HTTP request id)
    arrival_time: float = field(default_factory=time.monotonic)
    eos_token_ids: frozenset[int] = frozenset()  # the model's end tokens (tokenizer and config)
    seed: int = 0
    sequences: list[Sequence] = field(default_factory=list)
    first_token_time: float | None = None

    def __post_init__(self):
        self.seed = self.params.seed if self.params.seed is not None else random.getrandbits(32)
        self.sequences = [Sequence(self, i, list(self.prompt_token_ids)) for i in range(self.params.n)]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.sequences)

    @property
    def stop_ids_before_min_tokens(self) -> frozenset[int]:
        """Tokens that would end a sample, banned until it has min_tokens."""
        eos = frozenset() if self.params.ignore_eos else self.eos_token_ids
        return eos | frozenset(self.params.stop_token_ids)
