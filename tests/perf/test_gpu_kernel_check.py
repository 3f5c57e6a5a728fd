"""perf/gpu_kernel_check.py on CPU, so the GPU run does not fail on the script itself: its
GPU path lowered for CUDA at the real shapes (--dry-run), and the whole script run at tiny
shapes in interpret mode (--smoke), with the table it feeds perf/gpu_table.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from perf.gpu_table import kernel_section

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    done = subprocess.run([sys.executable, "perf/gpu_kernel_check.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_dry_run_lowers_every_timed_function_at_the_gpu_shapes(tmp_path):
    _run("--dry-run", "--out", str(tmp_path / "dry.json"))
    lowered = json.loads((tmp_path / "dry.json").read_text())["lowered"]
    calls = {(r["workload"], r["fn"]): r["triton_calls"] for r in lowered}
    for batch in (1, 8, 64):
        w = f"decode b={batch} ctx=2048"
        assert [calls[(w, f)] for f in ("tessera", "tessera_decode_only", "tessera_xla_table",
                                        "jax_paged_attention", "reference")] == [2, 2, 2, 1, 0]
    assert all(0 < r["host_table_s"] < 0.05 for r in lowered)


def test_smoke_run_times_everything_and_prints_ratios(tmp_path):
    out = _run("--smoke", "--out", str(tmp_path / "kernel.json"))
    result = json.loads((tmp_path / "kernel.json").read_text())
    assert result["kernel_ok"] and result["interpret"]
    assert [(r["case"], r["dtype"]) for r in result["correctness"]] == [
        (0, "float32"), (0, "bfloat16"), (6, "float32"), (6, "bfloat16")]
    decode = [t for t in result["timings"] if t["workload"].startswith("decode")]
    assert [t["workload"] for t in decode] == ["decode b=1 ctx=256", "decode b=4 ctx=256"]
    for t in decode:
        assert t["rel_err_vs_reference"] < 1e-2 and t["rel_err_decode_only"] < 1e-2
        assert t["rel_err_jax_vs_reference"] < 1e-2
        assert f"{t['workload']}: tessera " in out and " -> " in out
    table = "\n".join(kernel_section(result))
    assert "| decode b=4 ctx=256 |" in table and "kernel correctness (compiled, poisoned outputs): 4/4" in table
