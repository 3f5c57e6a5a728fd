"""The serving benchmark's figures, as vLLM's `vllm bench serve` defines them.

- TTFT: first streamed token minus the request's send time.
- TPOT: (end-to-end latency - TTFT) / (output tokens - 1), per request with more than one token.
- ITL: every gap between two chunks of a stream, pooled over all requests.
- E2EL: the last token's arrival minus the send time.
- Throughputs: completed requests, output tokens, and prompt + output tokens, each over the
  run's duration (first send to the last stream's end).
- Goodput: completed requests that meet every SLO given (TTFT, TPOT, E2EL in ms), per second.
Percentiles interpolate linearly between ranks (numpy's default, as vLLM).
"""

from __future__ import annotations

import math

import numpy as np

from perf.replay.client import Outcome

LATENCIES = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (50, 90, 99)
SLO_KEYS = ("ttft", "tpot", "e2el")


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds), as vLLM's --goodput."""
    slos = {}
    for item in items or []:
        key, _, value = item.partition(":")
        if key not in SLO_KEYS:
            raise ValueError(f"--goodput {item!r}: the key must be one of {', '.join(SLO_KEYS)}")
        try:
            slos[key] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: want KEY:MILLISECONDS, e.g. ttft:500") from None
        if slos[key] <= 0:
            raise ValueError(f"--goodput {item!r}: the limit must be > 0 ms")
    return slos


def per_request(o: Outcome) -> dict:
    times = o.stream.chunk_times
    ttft = times[0] - o.stream.start
    e2el = times[-1] - o.stream.start
    tokens = o.stream.tokens
    tpot = (e2el - ttft) / (tokens - 1) if tokens > 1 else None
    return dict(ttft=ttft, tpot=tpot, e2el=e2el, itl=[b - a for a, b in zip(times, times[1:])], tokens=tokens)


def summarise(outcomes: list[Outcome], duration_s: float, slos: dict[str, float]) -> dict:
    done = [o for o in outcomes if o.ok and o.stream.chunk_times]
    rows = [per_request(o) for o in done]
    values = {"ttft": [r["ttft"] for r in rows], "tpot": [r["tpot"] for r in rows if r["tpot"] is not None],
              "e2el": [r["e2el"] for r in rows], "itl": [x for r in rows for x in r["itl"]]}
    good = sum(all(r[k] is not None and r[k] * 1e3 <= limit for k, limit in slos.items()) for r in rows) if slos else None
    output = sum(r["tokens"] for r in rows)
    prompt = sum(o.input_tokens for o in done)
    errors = [o for o in outcomes if not o.ok]
    result = dict(
        requests=len(outcomes), completed=len(done), errors=len(errors),
        first_errors=sorted({o.stream.error[:200] for o in errors})[:3],
        duration_s=duration_s, input_tokens=prompt, output_tokens=output,
        asked_output_tokens=sum(o.asked_tokens for o in outcomes),
        request_throughput=len(done) / duration_s, output_throughput=output / duration_s,
        total_token_throughput=(prompt + output) / duration_s,
        goodput=None if good is None else good / duration_s, good_requests=good, slos_ms=slos,
        # How late the client sent requests: near 0 means it kept to the trace's clock.
        send_lag_max_s=max((o.sent_s - o.scheduled_s for o in outcomes if o.stream.start), default=0.0),
    )
    for name in LATENCIES:
        result[name] = stats(values[name])
    return result


def stats(values: list[float]) -> dict:
    """Seconds in, milliseconds out: mean, std and the percentiles."""
    if not values:
        return dict(count=0, mean_ms=math.nan, std_ms=math.nan, **{f"p{p}_ms": math.nan for p in PERCENTILES})
    ms = np.asarray(values) * 1e3
    return dict(count=len(values), mean_ms=float(ms.mean()), std_ms=float(ms.std()),
                **{f"p{p}_ms": float(np.percentile(ms, p)) for p in PERCENTILES})


def cdf_points(outcomes: list[Outcome]) -> dict[str, list[float]]:
    """Sorted per-request latencies in ms, for the CDF plots."""
    rows = [per_request(o) for o in outcomes if o.ok and o.stream.chunk_times]
    return {"ttft": sorted(r["ttft"] * 1e3 for r in rows),
            "tpot": sorted(r["tpot"] * 1e3 for r in rows if r["tpot"] is not None),
            "itl": sorted(x * 1e3 for r in rows for x in r["itl"]),
            "e2el": sorted(r["e2el"] * 1e3 for r in rows)}


def throughput_series(outcomes: list[Outcome], duration_s: float, bin_s: float = 1.0) -> dict[str, list[float]]:
    """Output tokens per second and requests sent per second, in bins of `bin_s` from the run's
    start. A stream's tokens are spread evenly over its chunks (usage counts them in total)."""
    bins = max(1, math.ceil(duration_s / bin_s))
    tokens, sent = [0.0] * bins, [0.0] * bins
    for o in outcomes:
        if o.stream.start:
            sent[min(bins - 1, max(0, int(o.sent_s / bin_s)))] += 1 / bin_s
        if o.ok and o.stream.chunk_times:
            share = o.stream.tokens / len(o.stream.chunk_times)
            for t in o.chunk_s:
                tokens[min(bins - 1, max(0, int(t / bin_s)))] += share / bin_s
    return {"t_s": [i * bin_s for i in range(bins)], "output_tok_s": tokens, "sent_req_s": sent}
