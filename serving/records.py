"""What one HTTP request did (tokens, times, text), and the ring of recent ones for /debug/requests."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

from serving.protocol.admin import RequestTimings

MAX_TOKEN_TIMES = 512
MAX_TEXT_CHARS = 4096  # of a prompt or completion, kept for logs and /debug (with prompt logging on)


@dataclass
class RequestRecord:
    """Filled by the handlers while a request runs; read by the middleware when it ends."""

    request_id: str
    endpoint: str
    tenant: str = "default"
    arrival: float = field(default_factory=time.time)  # wall clock
    arrival_mono: float = field(default_factory=time.perf_counter)
    status: int = 0
    model: str | None = None
    user: str | None = None
    tokenize_start: float = 0.0  # wall clock
    tokenize_end: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: list[str | None] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # seconds after arrival, per output step
    end_mono: float | None = None
    prompt_text: str | None = None  # clipped to MAX_TEXT_CHARS (set_prompt_text)
    completion_parts: list[str] = field(default_factory=list)  # at most MAX_TEXT_CHARS (add_completion_text)
    completion_chars: int = 0
    engine_timings: list[Any] = field(default_factory=list)  # runtime RequestTimings of each prompt
    disconnected: bool = False
    ticket: Any = None  # the admission ticket, released when the response is complete

    def release(self) -> None:
        if self.ticket is not None:
            self.ticket.release()
            self.ticket = None

    def set_prompt_text(self, text: str | None) -> None:
        self.prompt_text = None if text is None else clip(text)

    def add_completion_text(self, parts: list[str]) -> None:
        """Keep the first MAX_TEXT_CHARS of the completion, and count the rest."""
        for part in parts:
            room = MAX_TEXT_CHARS - self.completion_chars  # what is kept so far is all that came, up to the cap
            if room > 0:
                self.completion_parts.append(part[:room])
            self.completion_chars += len(part)

    def note_tokens(self, count: int) -> None:
        self.completion_tokens += count
        if len(self.token_times) < MAX_TOKEN_TIMES:
            self.token_times.append(time.perf_counter() - self.arrival_mono)

    def finish(self, status: int) -> None:
        self.status = 499 if self.disconnected else status
        self.end_mono = time.perf_counter()

    @property
    def ttft_s(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def e2e_s(self) -> float | None:
        return None if self.end_mono is None else self.end_mono - self.arrival_mono

    @property
    def completion_text(self) -> str | None:
        if not self.completion_parts:
            return None
        kept = "".join(self.completion_parts)
        return kept + _more(self.completion_chars - len(kept))

    def timings(self, with_text: bool) -> RequestTimings:
        gaps = [b - a for a, b in zip(self.token_times, self.token_times[1:])]
        return RequestTimings(
            request_id=self.request_id, endpoint=self.endpoint, status=self.status, model=self.model,
            tenant=self.tenant, prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens, finish_reasons=list(self.finish_reasons), arrival_unix=self.arrival,
            ttft_s=self.ttft_s, e2e_s=self.e2e_s, mean_itl_s=sum(gaps) / len(gaps) if gaps else None,
            token_times_s=[round(t, 6) for t in self.token_times],
            prompt=self.prompt_text if with_text else None,
            completion=self.completion_text if with_text else None,
        )


class RecentRequests:
    """A bounded ring of finished requests' timings, newest last."""

    def __init__(self, capacity: int, with_text: bool = False):
        self.capacity, self.with_text = capacity, with_text
        self._ring: collections.deque[RequestTimings] = collections.deque(maxlen=max(capacity, 0) or None)

    def add(self, record: RequestRecord) -> None:
        if self.capacity > 0:
            self._ring.append(record.timings(self.with_text))

    def items(self, limit: int | None = None) -> list[RequestTimings]:
        items = list(self._ring)
        return items[-limit:] if limit else items

    def mean_e2e_s(self, last: int = 32) -> float | None:
        times = [t.e2e_s for t in list(self._ring)[-last:] if t.e2e_s is not None and t.status == 200]
        return sum(times) / len(times) if times else None


def clip(text: str) -> str:
    """The first MAX_TEXT_CHARS of `text`, saying how much was left out: a record's size does not
    grow with a request's."""
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS] + _more(len(text) - MAX_TEXT_CHARS)


def _more(chars: int) -> str:
    return f"... [{chars} more characters]" if chars > 0 else ""
