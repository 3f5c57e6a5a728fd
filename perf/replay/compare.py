"""The regression check: is this run slower than the reference beyond the tolerance?

The reference is, in order of preference, a run against `--reference-url` in the same
invocation (the previous release, or the same build twice): both runs see the same machine at
nearly the same moment, so machine noise cancels in the ratio. Without one, the baseline's
recorded figures are the reference, and only on the CPU model they were recorded on.

A baseline file (perf/baselines/*.json) names its machine class and CPU model, the workload
it was recorded with (the trace and the slice: a different one is refused), the tolerance per
metric, and the reference run's figures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# metric -> (where in a run's metrics, whether higher is better)
METRICS = {
    "ttft_p50_ms": (("ttft", "p50_ms"), False),
    "tpot_p50_ms": (("tpot", "p50_ms"), False),
    "itl_p50_ms": (("itl", "p50_ms"), False),
    "e2el_p50_ms": (("e2el", "p50_ms"), False),
    "e2el_p90_ms": (("e2el", "p90_ms"), False),
    "output_throughput": (("output_throughput",), True),
}
DEFAULT_TOLERANCE = 0.25  # 25 %: above the ~7 % run-to-run noise PEERS.md measured on 2 shared cores
WORKLOAD_KEYS = ("trace", "start_s", "duration_s", "speed", "clip_context", "clip_output", "max_requests",
                 "block_tokens")


def figure(metrics: dict, metric: str) -> float:
    value = metrics
    for key in METRICS[metric][0]:
        value = value[key]
    return value


def figures(metrics: dict) -> dict[str, float]:
    return {name: figure(metrics, name) for name in METRICS}


def load_baseline(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"baseline {path} does not exist")
    try:
        baseline = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"baseline {path} is not JSON: {e}") from None
    missing = {"machine_class", "cpu_model", "workload", "tolerance", "reference"} - baseline.keys()
    if missing:
        raise ValueError(f"baseline {path} lacks {', '.join(sorted(missing))}")
    unknown = set(baseline["tolerance"]) - METRICS.keys()
    if unknown:
        raise ValueError(f"baseline {path}: unknown metrics in tolerance: {', '.join(sorted(unknown))}")
    return baseline


def make_baseline(machine_class: str, cpu_model: str, workload: dict, metrics: dict,
                  tolerance: float = DEFAULT_TOLERANCE) -> dict:
    return dict(machine_class=machine_class, cpu_model=cpu_model, workload=workload,
                tolerance={name: tolerance for name in METRICS}, reference=figures(metrics))


def check_workload(baseline: dict, workload: dict, path: str) -> None:
    differ = [k for k in WORKLOAD_KEYS if baseline["workload"].get(k) != workload.get(k)]
    if differ:
        detail = ", ".join(f"{k}: baseline {baseline['workload'].get(k)!r}, this run {workload.get(k)!r}" for k in differ)
        raise ValueError(f"baseline {path} was recorded with another workload ({detail})")


def compare(candidate: dict, reference: dict | None, baseline: dict, baseline_path: str, cpu_model: str,
            candidate_errors: int = 0, reference_errors: int = 0) -> dict:
    """A comparison table and the names of the metrics that regressed. `reference` is the
    same-invocation reference run's metrics, or None to use the baseline's figures."""
    if reference is not None:
        basis, reference_figures = "ratio to the reference run in this invocation", figures(reference)
    elif baseline["cpu_model"] != cpu_model:
        raise ValueError(f"baseline {baseline_path} was recorded on {baseline['cpu_model']!r}, this machine is "
                         f"{cpu_model!r}: pass --reference-url so that the ratio cancels the machine")
    else:
        basis, reference_figures = f"ratio to the baseline's recorded figures ({baseline['cpu_model']})", baseline["reference"]
    rows, regressed = [], []
    for name, tolerance in baseline["tolerance"].items():
        higher_is_better = METRICS[name][1]
        ours, theirs = (math.nan if v is None else v for v in (figure(candidate, name), reference_figures[name]))
        ratio = ours / theirs if theirs else math.inf
        if math.isnan(ours) or math.isnan(theirs):
            bad = not math.isnan(theirs)  # a figure the reference has and we lost is a regression
        else:
            bad = ratio < 1 / (1 + tolerance) if higher_is_better else ratio > 1 + tolerance
        allowed = f">= {1 / (1 + tolerance):.2f}" if higher_is_better else f"<= {1 + tolerance:.2f}"
        rows.append(dict(metric=name, candidate=ours, reference=theirs, ratio=ratio, allowed=allowed, regressed=bad))
        if bad:
            regressed.append(name)
    if candidate_errors > reference_errors:
        rows.append(dict(metric="errors", candidate=candidate_errors, reference=reference_errors,
                         ratio=math.inf, allowed="no more than the reference", regressed=True))
        regressed.append("errors")
    return dict(baseline=baseline_path, basis=basis, rows=rows, regressed=regressed)
