"""Traces: the Azure LLM inference 2023 CSVs and Mooncake's FAST'25 JSONL, as one request list.

A request carries its arrival time (seconds from the trace's first request), its prompt and
output lengths, and, for Mooncake, the ids of its 512-token prefix blocks: equal ids mean an
equal prefix. The prompt is made of token ids (the traces hold no text): each block id maps
to a fixed run of tokens drawn from a generator seeded by that id, so requests that share
block ids share a prefix and the server's prefix cache sees what the original system saw.
Azure rows have no block ids: each prompt is drawn from its own seed and shares nothing.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

MOONCAKE_BLOCK_TOKENS = 512  # the block size Mooncake's hash ids were taken over
TOKEN_RANGE = (10, 1000)  # below any real model's vocabulary size, above its usual special ids
FORMATS = ("azure", "mooncake")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Slice:
    """Which part of a trace to send, and how: the window is in the trace's own seconds."""

    start_s: float = 0.0
    duration_s: float | None = None
    speed: float = 1.0  # arrival gaps are divided by this
    clip_context: int | None = None  # prompt + output tokens at most
    clip_output: int | None = None  # output tokens at most
    max_requests: int | None = None

    def __post_init__(self):
        if self.speed <= 0:
            raise ValueError(f"--speed must be > 0, got {self.speed}")
        if self.start_s < 0 or (self.duration_s is not None and self.duration_s <= 0):
            raise ValueError("--start must be >= 0 and --duration > 0")
        if self.clip_output is not None and self.clip_output < 1:
            raise ValueError(f"--clip-output must be >= 1, got {self.clip_output}")
        if self.clip_context is not None and self.clip_context < 2:
            raise ValueError(f"--clip-context must be >= 2, got {self.clip_context}")


def detect_format(path: Path) -> str:
    if path.suffix == ".csv":
        return "azure"
    if path.suffix in (".jsonl", ".json"):
        return "mooncake"
    raise ValueError(f"{path}: unknown trace format (want an Azure .csv or a Mooncake .jsonl; or pass --format)")


def load(path: str | Path, fmt: str | None = None) -> list[TraceRequest]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace {path} does not exist")
    fmt = fmt or detect_format(path)
    reader = {"azure": _read_azure, "mooncake": _read_mooncake}[fmt]
    requests = reader(path)
    if not requests:
        raise ValueError(f"{path}: the trace holds no requests")
    return requests


def _read_azure(path: Path) -> list[TraceRequest]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= rows[0].keys():
        raise ValueError(f"{path}: not an Azure trace (columns TIMESTAMP, ContextTokens, GeneratedTokens)")
    try:
        # Seven fractional digits: datetime takes six.
        times = [datetime.fromisoformat(r["TIMESTAMP"].strip()[:26]) for r in rows]
        first = times[0] if times else None
        return [TraceRequest((t - first).total_seconds(), int(r["ContextTokens"]), int(r["GeneratedTokens"]))
                for t, r in zip(times, rows)]
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: bad Azure trace row: {e}") from None


def _read_mooncake(path: Path) -> list[TraceRequest]:
    requests = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                requests.append(TraceRequest(row["timestamp"] / 1000, int(row["input_length"]),
                                             int(row["output_length"]), tuple(row.get("hash_ids", ()))))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{number}: not a Mooncake trace line ({type(e).__name__}: {e})") from None
    first = min(r.arrival_s for r in requests) if requests else 0.0
    return [TraceRequest(r.arrival_s - first, r.input_tokens, r.output_tokens, r.hash_ids) for r in requests]


def select(requests: list[TraceRequest], window: Slice) -> list[TraceRequest]:
    """The window's requests, re-timed from its start and scaled by the speed, lengths clipped."""
    end = window.start_s + window.duration_s if window.duration_s is not None else float("inf")
    chosen = sorted((r for r in requests if window.start_s <= r.arrival_s < end), key=lambda r: r.arrival_s)
    if window.max_requests is not None:
        chosen = chosen[:window.max_requests]
    if not chosen:
        raise ValueError(f"no requests in the trace between {window.start_s:g} s and {end:g} s")
    return [_clip(TraceRequest((r.arrival_s - window.start_s) / window.speed, r.input_tokens, r.output_tokens,
                               r.hash_ids), window) for r in chosen]


def _clip(r: TraceRequest, window: Slice) -> TraceRequest:
    output = max(1, r.output_tokens)  # a request asks for one token at least
    if window.clip_output is not None:
        output = min(output, window.clip_output)
    prompt = max(1, r.input_tokens)
    if window.clip_context is not None:
        output = min(output, window.clip_context - 1)
        prompt = min(prompt, window.clip_context - output)
    return TraceRequest(r.arrival_s, prompt, output, r.hash_ids)


def prompt_tokens(request: TraceRequest, index: int, block_tokens: int = MOONCAKE_BLOCK_TOKENS,
                  token_range: tuple[int, int] = TOKEN_RANGE, seed: int = 0) -> list[int]:
    """The request's prompt: its blocks' tokens (shared by every request naming the same block
    id), then tokens of its own to the trace's length."""
    tokens: list[int] = []
    for block in request.hash_ids:
        if len(tokens) >= request.input_tokens:
            break
        tokens += _draw(("block", seed, block), block_tokens, token_range)
    if len(tokens) < request.input_tokens:
        tokens += _draw(("request", seed, index), request.input_tokens - len(tokens), token_range)
    return tokens[:request.input_tokens]


def _draw(key: tuple, count: int, token_range: tuple[int, int]) -> list[int]:
    rng = random.Random(repr(key))  # str seeds hash with SHA-512: equal in every process
    low, high = token_range
    return [rng.randrange(low, high) for _ in range(count)]


def describe(requests: list[TraceRequest]) -> dict:
    """Totals a report and a test can check without a server."""
    shared = sum(1 for r in requests if r.hash_ids)
    return dict(requests=len(requests), input_tokens=sum(r.input_tokens for r in requests),
                output_tokens=sum(r.output_tokens for r in requests),
                span_s=requests[-1].arrival_s - requests[0].arrival_s if requests else 0.0,
                with_prefix_blocks=shared)


def write_mooncake(requests: list[TraceRequest], path: Path, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> None:
    """The prepared slice as Mooncake JSONL (clipped, re-timed), e.g. for aiperf or guidellm."""
    with path.open("w", encoding="utf-8") as f:
        for r in requests:
            blocks = -(-r.input_tokens // block_tokens)
            f.write(json.dumps(dict(timestamp=round(r.arrival_s * 1000), input_length=r.input_tokens,
                                    output_length=r.output_tokens, hash_ids=list(r.hash_ids[:blocks]))) + "\n")


def ideal_prefix_reuse(requests: list[TraceRequest], block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> float:
    """The share of prompt tokens a perfect prefix cache could serve: each request's leading
    blocks seen in an earlier request (a block id implies its predecessors, as in the trace),
    less the last token, which is always computed."""
    seen: set[int] = set()
    reusable = total = 0
    for r in requests:
        blocks = r.hash_ids[:-(-r.input_tokens // block_tokens)]
        leading = next((i for i, b in enumerate(blocks) if b not in seen), len(blocks))
        reusable += min(leading * block_tokens, r.input_tokens - 1)
        total += r.input_tokens
        seen.update(blocks)
    return reusable / total if total else 0.0
