"""`tessera replay`: the arguments, and one invocation from trace to report and verdict.

Exit status: 0 done (and no regression), 1 a regression against --compare, 2 bad input
(an unreadable trace or baseline, a bad flag, a server that is not ready).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from perf.replay import trace

REPO = Path(__file__).resolve().parents[2]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="an Azure LLM inference CSV or a Mooncake JSONL trace")
    p.add_argument("--format", choices=trace.FORMATS, help="trace format (default: from the file name's suffix)")
    p.add_argument("--url", default=os.environ.get("TESSERA_URL", "http://127.0.0.1:8000"),
                   help="server or gateway to replay against [TESSERA_URL; default: http://127.0.0.1:8000]")
    p.add_argument("--reference-url", help="replay against this server first (e.g. the previous release); "
                                           "--compare then uses ratios to it")
    p.add_argument("--api-key", default=os.environ.get("TESSERA_API_KEY"), help="bearer token [TESSERA_API_KEY]")
    p.add_argument("--model", help="model name to ask for (default: the server's)")
    p.add_argument("--start", type=float, default=0.0, help="trace second to start at (default 0)")
    p.add_argument("--duration", type=float, help="trace seconds to replay (default: to the end)")
    p.add_argument("--max-requests", type=int, help="send at most this many requests")
    p.add_argument("--speed", type=float, default=1.0, help="divide the arrival gaps by this (2 = twice as fast)")
    p.add_argument("--clip-context", type=int, help="prompt + output tokens at most per request (a small model's context)")
    p.add_argument("--clip-output", type=int, help="output tokens at most per request")
    p.add_argument("--block-tokens", type=int, default=trace.MOONCAKE_BLOCK_TOKENS,
                   help="tokens per Mooncake hash id: the shared prefix blocks (default 512, the trace's own)")
    p.add_argument("--token-range", default="%d:%d" % trace.TOKEN_RANGE,
                   help="prompt token ids are drawn from LOW:HIGH (default %d:%d)" % trace.TOKEN_RANGE)
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt tokens")
    p.add_argument("--goodput", nargs="+", metavar="KEY:MS", help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take before it counts as an error")
    p.add_argument("--out", default=str(REPO / "perf" / "results" / "replay"), help="folder for the report files")
    p.add_argument("--name", help="file name stem of the report (default: the trace's stem)")
    p.add_argument("--compare", metavar="BASELINE", help="fail (exit 1) on a regression against this baseline file")
    p.add_argument("--write-baseline", metavar="PATH", help="record this run as a baseline file")
    p.add_argument("--machine-class", help="machine class named in --write-baseline (default: from the CPU model)")
    p.add_argument("--write-trace", metavar="PATH", help="also write the prepared slice as Mooncake JSONL")
    p.add_argument("--note", help="a line for the report, e.g. the server's flags")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from perf.replay import compare as regression

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    window, requests, prompts, workload, targets = _prepare(args)
    baseline = regression.load_baseline(args.compare) if args.compare else None
    if baseline:
        regression.check_workload(baseline, workload, args.compare)
    for _, url, _ in targets:
        _check_ready(url, args.api_key)
    slos = _slos(args)
    runs = [_one_run(label, url, target, requests, prompts, args, slos) for label, url, target in targets]
    result = dict(started_at=started, machine=machine_info(), note=args.note, workload=workload,
                  trace=_trace_summary(requests, Path(args.trace), window, args.block_tokens), runs=runs)
    if baseline:
        reference = runs[0]["metrics"] if len(runs) == 2 else None
        result["comparison"] = regression.compare(runs[-1]["metrics"], reference, baseline, args.compare,
                                                  result["machine"]["cpu_model"], runs[-1]["metrics"]["errors"],
                                                  reference["errors"] if reference else 0)
    if args.write_baseline:
        _write_baseline(args, result)
    _write_report(args, result)
    return 1 if baseline and result["comparison"]["regressed"] else 0


def _prepare(args: argparse.Namespace):
    """Every check of the input before a request is sent: (window, requests, prompts, workload, targets)."""
    from perf.replay.client import Target

    window = trace.Slice(args.start, args.duration, args.speed, args.clip_context, args.clip_output, args.max_requests)
    token_range = _token_range(args.token_range)
    if args.block_tokens < 1:
        raise ValueError(f"--block-tokens must be >= 1, got {args.block_tokens}")
    _slos(args)
    labelled = ([("reference", args.reference_url), ("candidate", args.url)] if args.reference_url
                else [("run", args.url)])
    targets = [(label, url, Target.parse(url, args.api_key)) for label, url in labelled]
    trace_path = Path(args.trace)
    requests = trace.select(trace.load(trace_path, args.format), window)
    prompts = [trace.prompt_tokens(r, i, args.block_tokens, token_range, args.seed) for i, r in enumerate(requests)]
    workload = dict(trace=trace_path.name, start_s=args.start, duration_s=args.duration, speed=args.speed,
                    clip_context=args.clip_context, clip_output=args.clip_output, max_requests=args.max_requests,
                    block_tokens=args.block_tokens)
    Path(args.out).mkdir(parents=True, exist_ok=True)  # a bad --out fails now, not after the runs
    if args.write_trace:
        trace.write_mooncake(requests, Path(args.write_trace), args.block_tokens)
    return window, requests, prompts, workload, targets


def _slos(args: argparse.Namespace) -> dict[str, float]:
    from perf.replay import metrics

    return metrics.parse_slos(args.goodput)


def _write_baseline(args: argparse.Namespace, result: dict) -> None:
    """The first run (the reference, when there is one) as a baseline file."""
    from perf.replay import compare as regression
    from perf.replay import report

    cpu = result["machine"]["cpu_model"]
    machine_class = args.machine_class or re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-")
    baseline = regression.make_baseline(machine_class, cpu, result["workload"], result["runs"][0]["metrics"])
    report.write_json(baseline, Path(args.write_baseline))


def _write_report(args: argparse.Namespace, result: dict) -> None:
    """JSON, Markdown (also printed) and the plots, named after --name or the trace."""
    from perf.replay import report

    stem = Path(args.out) / (args.name or Path(args.trace).stem)
    if not args.no_plots:
        try:
            result["plots"] = [str(p) for p in report.plot(result["runs"], stem)]
        except ImportError:
            print("tessera replay: no plots (matplotlib is not installed: pip install -e '.[replay]')", file=sys.stderr)
    for run_ in result["runs"]:  # the plot data stays out of the JSON
        run_.pop("cdf"), run_.pop("series")
    report.write_json(result, Path(f"{stem}.json"))
    text = report.markdown(result)
    Path(f"{stem}.md").write_text(text, encoding="utf-8")
    print(text)


def _one_run(label, url, target, requests, prompts, args, slos) -> dict:
    from perf.replay import metrics
    from perf.replay.client import progress_bar, replay

    bar = None if args.no_progress else progress_bar(len(requests), f"replay {label}")
    before = _prefix_counters(url, args.api_key)
    outcomes, duration = asyncio.run(replay(target, requests, prompts, args.model, args.timeout,
                                            (lambda o: bar.update(1)) if bar else (lambda o: None)))
    if bar:
        bar.close()
    after = _prefix_counters(url, args.api_key)
    summary = metrics.summarise(outcomes, duration, slos)
    if before and after and after[1] > before[1]:
        summary["prefix_cache_hit_rate"] = (after[0] - before[0]) / (after[1] - before[1])
    return dict(label=label, url=url, metrics=summary, cdf=metrics.cdf_points(outcomes),
                series=metrics.throughput_series(outcomes, duration, bin_s=max(1.0, round(duration / 100))))


def _token_range(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if not match or int(match[1]) >= int(match[2]):
        raise ValueError(f"--token-range {text!r} must be LOW:HIGH with LOW < HIGH")
    return int(match[1]), int(match[2])


def _check_ready(url: str, api_key: str | None) -> None:
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        status = httpx.get(url.rstrip("/") + "/ready", headers=headers, timeout=10).status_code
    except httpx.HTTPError as e:
        raise ValueError(f"server {url} does not answer ({type(e).__name__}: {e})") from None
    if status != 200:
        raise ValueError(f"server {url} is not ready (GET /ready: HTTP {status})")


def _prefix_counters(url: str, api_key: str | None) -> tuple[float, float] | None:
    """(prefix cache hit tokens, queried tokens) from /metrics, or None where it is not readable."""
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        text = httpx.get(url.rstrip("/") + "/metrics", headers=headers, timeout=10).text
    except httpx.HTTPError:
        return None
    sums = {}
    for kind in ("hits", "queries"):
        values = re.findall(rf"^\w+:prefix_cache_{kind}_total(?:{{[^}}]*}})? (\S+)$", text, re.M)
        if not values:
            return None
        sums[kind] = sum(float(v) for v in values)
    return sums["hits"], sums["queries"]


def _trace_summary(requests, path: Path, window: trace.Slice, block_tokens: int) -> dict:
    totals = trace.describe(requests)
    end = f"{window.start_s + window.duration_s:g}" if window.duration_s is not None else "end"
    clip = "".join([f", context <= {window.clip_context}" if window.clip_context else "",
                    f", output <= {window.clip_output}" if window.clip_output else ""])
    if totals["with_prefix_blocks"]:
        reuse = trace.ideal_prefix_reuse(requests, block_tokens)
        prefix = (f"Mooncake hash ids as shared {block_tokens}-token prefix blocks; at most "
                  f"{reuse:.1%} of prompt tokens can come from the prefix cache")
    else:
        prefix = "no shared prefixes (each prompt drawn on its own)"
    return dict(name=path.name, slice=f"trace seconds {window.start_s:g}-{end}, speed x{window.speed:g}{clip}",
                prefix=prefix, **totals)


def machine_info() -> dict:
    return dict(cpu_model=cpu_model(), cores=os.cpu_count(), commit=_commit())


def cpu_model() -> str:
    """lscpu's model name (the figures' machine), /proc/cpuinfo's where lscpu is missing."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if match:
            return match[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        return match[1].strip() if match else "unknown"
    except OSError:
        return "unknown"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
