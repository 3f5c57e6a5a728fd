"""A replay's report: JSON (everything), a Markdown table, and PNG plots.

Plots need matplotlib (the `replay` extra, also in the test extra); without it the report
says so and the JSON and Markdown are still written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from perf.replay.metrics import LATENCIES, PERCENTILES

NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}


def write_json(report: dict, path: Path) -> None:
    """Strict JSON: a figure that has no value (NaN: no samples) is written as null."""
    path.write_text(json.dumps(_strict(report), indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")


def _strict(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _ms(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:,.2f}" if abs(value) < 10 else f"{value:,.1f}"


def markdown(report: dict) -> str:
    lines = [f"## Replay: {report['trace']['name']} ({report['trace']['slice']})", "",
             f"Machine: {report['machine']['cpu_model']}, {report['machine']['cores']} cores; "
             f"tessera {report['machine']['commit']}; {report['started_at']}.", "",
             f"Workload: {report['trace']['requests']} requests over {report['trace']['span_s']:.1f} s of arrivals, "
             f"{report['trace']['input_tokens']:,} prompt and {report['trace']['output_tokens']:,} output tokens asked; "
             f"{report['trace']['prefix']}.", ""]
    if report.get("note"):
        lines += [report["note"], ""]
    for run in report["runs"]:
        lines += _run_tables(run)
    if report.get("comparison"):
        lines += comparison_table(report["comparison"])
    if report.get("plots"):
        lines += ["Plots: " + ", ".join(f"`{Path(p).name}`" for p in report["plots"]), ""]
    return "\n".join(lines)


def _run_tables(run: dict) -> list[str]:
    m = run["metrics"]
    goodput = "n/a (no --goodput SLOs)" if m["goodput"] is None else (
        f"{m['goodput']:.2f} req/s ({m['good_requests']} of {m['completed']} within "
        + ", ".join(f"{k} <= {v:g} ms" for k, v in m["slos_ms"].items()) + ")")
    lines = [f"### {run['label']}: {run['url']}", "",
             "| requests | completed | errors | duration | req/s | output tok/s | total tok/s | goodput | max send lag |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| {m['requests']} | {m['completed']} | {m['errors']} | {m['duration_s']:.1f} s | "
             f"{m['request_throughput']:.2f} | {m['output_throughput']:.1f} | {m['total_token_throughput']:.1f} | "
             f"{goodput} | {m['send_lag_max_s'] * 1e3:.0f} ms |", "",
             "| latency (ms) | mean | " + " | ".join(f"P{p}" for p in PERCENTILES) + " | count |",
             "|---|---|" + "---|" * len(PERCENTILES) + "---|"]
    for name in LATENCIES:
        s = m[name]
        lines.append(f"| {NAMES[name]} | {_ms(s['mean_ms'])} | "
                     + " | ".join(_ms(s[f'p{p}_ms']) for p in PERCENTILES) + f" | {s['count']} |")
    if m.get("prefix_cache_hit_rate") is not None:
        lines += ["", f"Server prefix cache hit rate over the run (tessera:prefix_cache_hits / queries): "
                      f"{m['prefix_cache_hit_rate']:.1%}"]
    if m["first_errors"]:
        lines += ["", "Errors (first kinds): " + "; ".join(f"`{e}`" for e in m["first_errors"])]
    return lines + [""]


def comparison_table(comparison: dict) -> list[str]:
    lines = [f"### Regression check against `{comparison['baseline']}` ({comparison['basis']})", "",
             "| metric | candidate | reference | ratio | allowed | verdict |", "|---|---|---|---|---|---|"]
    for row in comparison["rows"]:
        lines.append(f"| {row['metric']} | {_ms(row['candidate'])} | {_ms(row['reference'])} | {_ms(row['ratio'])} | "
                     f"{row['allowed']} | {'REGRESSED' if row['regressed'] else 'ok'} |")
    verdict = "FAIL: " + ", ".join(comparison["regressed"]) if comparison["regressed"] else "pass"
    return lines + ["", f"Verdict: **{verdict}**", ""]


def plot(runs: list[dict], out_prefix: Path) -> list[Path]:
    """Latency CDFs (one panel per metric, one line per run) and throughput over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cdf_path, tput_path = Path(f"{out_prefix}-latency-cdf.png"), Path(f"{out_prefix}-throughput.png")
    fig, axes = plt.subplots(1, len(LATENCIES), figsize=(4 * len(LATENCIES), 3.4), dpi=100)
    for ax, name in zip(axes, LATENCIES):
        for run in runs:
            xs = run["cdf"][name]
            if xs:
                ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=run["label"])
        ax.set_xscale("log")
        ax.set_xlabel(f"{NAMES[name]} (ms)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests (ITL: of gaps)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(cdf_path)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.4), dpi=100)
    for run in runs:
        series = run["series"]
        ax.plot(series["t_s"], series["output_tok_s"], label=f"{run['label']}: output tok/s")
    twin = ax.twinx()
    series = runs[0]["series"]
    twin.step(series["t_s"], series["sent_req_s"], where="post", color="grey", alpha=0.5, label="requests sent/s")
    ax.set_xlabel("seconds from the run's start")
    ax.set_ylabel("output tokens/s")
    twin.set_ylabel("requests sent/s")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    twin.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(tput_path)
    plt.close(fig)
    return [cdf_path, tput_path]
