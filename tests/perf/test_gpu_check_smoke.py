"""The GPU check's Python and shell on this CPU, so the one GPU call does not die on a typo:
perf/gpu_check.sh in its smoke mode (tiny shapes; the kernel step, another file's, left out)
runs Tessera bf16-as-float32, Tessera fp8 and transformers end to end and prints the table;
and the table's arithmetic on made-up results, against the issue's targets."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from perf.gpu_table import kernel_section, roofline_tps, serving_section

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("gpu-smoke")
    env = dict(os.environ, GPU_CHECK_SMOKE="1", GPU_CHECK_SKIP="kernel", PYTHON=str(ROOT / ".venv/bin/python"),
               JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the tests' eight host devices are not the bench's
    done = subprocess.run([str(ROOT / "perf/gpu_check.sh"), str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def test_the_smoke_run_serves_bf16_fp8_and_transformers_and_prints_the_table(smoke_run):
    out, stdout = smoke_run
    for phase in ("tessera-tiny", "tessera-tiny-fp8", "transformers-tiny"):
        assert f"== {phase}: rc=0 in " in stdout
    plain, fp8, peer = (json.loads((out / f"{n}.json").read_text())
                        for n in ("tessera_tiny", "tessera_tiny_fp8", "transformers_tiny"))
    assert plain["plan"]["layout"] == "dense" and fp8["plan"]["layout"] == "fp8" and fp8["plan"]["linear"] == "xla"
    # The tied head: transformers reads the table as the head; Tessera's CPU kernels read their own
    # [embed, vocab] copy of it, and a step reads the table itself only by rows.
    assert plain["decode_weight_bytes"] == peer["decode_weight_bytes"] == peer["param_bytes"]
    assert plain["param_bytes"] == peer["param_bytes"] + 1024 * 128 * 4
    assert fp8["param_bytes"] < plain["param_bytes"]
    for r in (plain, fp8, peer):
        assert len(r["ttft_s"]) == 3 and (r["concurrent"], r["new_tokens"], r["long_prompt"]) == (4, 8, 64)
    assert plain["copy_gbs"] > 0 and plain["kv_pages"] > 0 and "decode_tps_series" in plain
    assert plain["memory_stats"] is None  # the CPU reports none: the explicit KV size (--kv-gib) stood
    assert "decode_tps_series" not in fp8 and fp8["step_custom_calls"].keys() <= plain["step_custom_calls"].keys()
    a = fp8["fp8_agreement"]
    assert a["positions"] == 2 * 32 and 0.5 <= a["top1_agreement"] <= 1 and 0 < a["mean_abs_logit_error"] < 1
    table = (out / "gpu_check.md").read_text()
    assert table == stdout[stdout.index("device: "):]
    assert "| tiny | tessera | float32 | cpu |" in table and "| tiny | tessera | fp8 | cpu |" in table
    assert "| tiny | transformers | float32 | sdpa |" in table
    assert f"top-1 agreement {a['top1_agreement']:.2%} over 64 positions" in table
    assert "kernel check: no result" in table and "Against issue 23's targets (tiny):" in table


def _result(**changes) -> dict:
    base = dict(system="tessera", attention="pallas", dtype="bfloat16", quantization=None, param_bytes=16_060_522_496,
                decode_weight_bytes=15_010_000_000, kv_bytes_per_token=131_072, prompt_tokens=128, new_tokens=256,
                long_prompt=2048, concurrent=256, ttft_s=[0.05] * 9 + [0.12], decode_tps=250.0, concurrent_tps=9000.0,
                copy_gbs=4300.0, device="NVIDIA H200 (gpu)")
    return base | changes


def test_the_table_divides_by_the_measured_bandwidth_and_judges_the_targets(tmp_path):
    ours = _result()
    (tmp_path / "tessera_llama-3.1-8b.json").write_text(json.dumps(ours))
    (tmp_path / "tessera_llama-3.1-8b_fp8.json").write_text(json.dumps(_result(
        quantization="fp8", param_bytes=9e9, decode_weight_bytes=8e9, concurrent_tps=11000.0, decode_tps=400.0,
        fp8_agreement=dict(positions=1024, top1_agreement=0.9, max_abs_logit_error=0.2, mean_abs_logit_error=0.01,
                           max_rel_logit_error=0.02))))
    # 15.01 GB of weights + 256 tokens of mean context x 128 KiB = 15.0436 GB per step at 4.3 TB/s.
    assert roofline_tps(ours, 4300.0) == pytest.approx(4300e9 / (15_010_000_000 + 256 * 131_072))
    rows, notes = serving_section(tmp_path, ["llama-3.1-8b"])
    assert rows[2] == ("| llama-3.1-8b | tessera | bfloat16 | pallas | 50.0 ms | 120.0 ms | 250.0 tok/s | 286 tok/s | "
                       "87% | 256 | 9000 | 35.2 |")
    assert rows[4] == "| llama-3.1-8b | transformers | no result (see the log) | | | | | | | | | |"
    assert "- bfloat16 batch-1 decode >= 80% of the measured roofline: 87%: met" in notes
    assert "- >= 8,000 tok/s at 256 concurrent: 11,000 tok/s (fp8, 256 concurrent): met" in notes
    assert "- TTFT P99 of a 2,048-token prompt < 100 ms: 120.0 ms: NOT met" in notes
    assert any("top-1 agreement 90.00% over 1024 positions" in n for n in notes)
    assert kernel_section({"correctness": "not a list"})[0].startswith("kernel check: kernel.json not in the expected")
