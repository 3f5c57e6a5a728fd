"""Send a prepared trace to a server on the trace's clock and record each stream's chunk times.

Every request is started at its arrival time whether or not earlier ones have finished (an
open loop, as the trace was recorded), streamed from /v1/completions with token-id prompts,
`ignore_eos` and the trace's output length, so every run asks for the same work.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from perf.load import Stream, stream_once
from perf.replay.trace import TraceRequest


@dataclass(slots=True)
class Outcome:
    """One request's result; times in seconds from the run's start."""

    index: int
    scheduled_s: float
    input_tokens: int
    asked_tokens: int
    stream: Stream
    start: float  # perf_counter at the run's start

    @property
    def ok(self) -> bool:
        return self.stream.ok and not self.stream.cut

    @property
    def sent_s(self) -> float:
        return self.stream.start - self.start

    @property
    def chunk_s(self) -> list[float]:
        return [t - self.start for t in self.stream.chunk_times]


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    path: str
    tls: bool
    headers: dict[str, str]

    @classmethod
    def parse(cls, url: str, api_key: str | None = None) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--url {url!r} must be an http:// or https:// server URL")
        tls = parts.scheme == "https"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return cls(parts.hostname, parts.port or (443 if tls else 80),
                   parts.path.rstrip("/") + "/v1/completions", tls, headers)


def request_body(prompt: list[int], max_tokens: int, model: str | None) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if model:
        body["model"] = model
    return body


async def replay(target: Target, requests: list[TraceRequest], prompts: list[list[int]], model: str | None,
                 timeout_s: float, on_done: Callable[[Outcome], None] = lambda o: None) -> tuple[list[Outcome], float]:
    """(outcomes in trace order, the run's duration: first send to last finished stream)."""
    start = time.perf_counter()

    async def one(index: int, request: TraceRequest) -> Outcome:
        await asyncio.sleep(max(0.0, start + request.arrival_s - time.perf_counter()))
        body = request_body(prompts[index], request.output_tokens, model)
        stream = await stream_once(target.host, target.port, target.path, body, time.perf_counter() + timeout_s,
                                   target.headers, target.tls)
        if stream.cut:
            stream.ok, stream.error = False, f"no answer within --timeout {timeout_s:g} s"
        outcome = Outcome(index, request.arrival_s, request.input_tokens, request.output_tokens, stream, start)
        on_done(outcome)
        return outcome

    outcomes = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    ends = [o.stream.chunk_times[-1] for o in outcomes if o.stream.chunk_times]
    return list(outcomes), (max(ends) if ends else time.perf_counter()) - start


def progress_bar(total: int, label: str):
    """tqdm on stderr when it is installed (it comes with the test extra), else nothing."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=label, unit="req", file=sys.stderr, dynamic_ncols=True, leave=False)
