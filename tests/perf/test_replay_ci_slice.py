"""The CI slice of `tessera replay`: a minute of the Azure conversation trace (at 4x) on the demo
model, replayed against a normal server as the reference and a deliberately slowed one
(perf.replay.slowed_serve, 40 ms more per engine step) as the candidate, in one invocation.

It checks the pipeline and the report, and that --compare fails the slowed build; not the
speed (the servers share two cores with everything else)."""

from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from perf.load import free_port, start_server, stop_server
from perf.replay import trace
from serving.cli import main as tessera

SLICE = dict(duration_s=60.0, speed=4.0, clip_context=128, clip_output=16)
SLICE_FLAGS = ["--duration", "60", "--speed", "4", "--clip-context", "128", "--clip-output", "16"]
SERVER_FLAGS = ["--max-num-seqs", "32", "--max-queue", "512", "--max-num-batched-tokens", "128",
                "--token-buckets", "32,128"]
SLOWED = ("-m", "perf.replay.slowed_serve", "--step-delay-ms", "40")
PERF = Path(__file__).resolve().parents[2] / "perf"
AZURE = PERF / "traces" / "azure-conv-first-minute.csv"  # the first minute of the conversation trace
BASELINE = PERF / "baselines" / "ci-slice.json"


@pytest.fixture(scope="module")
def servers():
    ports = free_port(), free_port()
    with ThreadPoolExecutor(2) as pool:  # both warm up at once
        starting = [pool.submit(start_server, ports[0], SERVER_FLAGS),
                    pool.submit(start_server, ports[1], SERVER_FLAGS, launcher=SLOWED)]
    started = [f.result() for f in starting if f.exception() is None]
    try:
        for f in starting:
            if f.exception() is not None:
                raise f.exception()
        yield [f"http://127.0.0.1:{p}" for p in ports]
    finally:
        for process in started:
            stop_server(process)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_ci_slice_reports_and_the_slowed_build_fails_compare(servers, tmp_path, capsys):
    normal, slowed = servers
    code = tessera(["replay", str(AZURE), "--reference-url", normal, "--url", slowed, *SLICE_FLAGS,
                    "--goodput", "ttft:60000", "--compare", str(BASELINE), "--out", str(tmp_path), "--name", "ci",
                    "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 1, printed

    chosen = trace.select(trace.load(AZURE), trace.Slice(**SLICE))
    multi_token = sum(r.output_tokens > 1 for r in chosen)
    report = json.loads((tmp_path / "ci.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["reference", "candidate"]
    assert report["trace"]["requests"] == 191 and report["machine"]["cpu_model"]
    for run in report["runs"]:
        m = run["metrics"]
        assert (m["requests"], m["completed"], m["errors"]) == (191, 191, 0)
        assert (m["input_tokens"], m["output_tokens"], m["asked_output_tokens"]) == (20800, 3047, 3047)
        assert (m["ttft"]["count"], m["e2el"]["count"], m["tpot"]["count"]) == (191, 191, multi_token)
        assert 0 < m["itl"]["count"] <= 3047 - 191  # one gap per chunk after the first
        assert m["good_requests"] == 191  # a one-minute TTFT SLO holds for every request
        assert m["prefix_cache_hit_rate"] < 0.01  # Azure prompts share nothing
        assert m["send_lag_max_s"] < 1.0  # the client kept to the trace's clock

    comparison = report["comparison"]
    assert comparison["basis"] == "ratio to the reference run in this invocation"
    assert {"itl_p50_ms", "tpot_p50_ms"} <= set(comparison["regressed"])
    itl = next(r for r in comparison["rows"] if r["metric"] == "itl_p50_ms")
    assert itl["ratio"] > 1.5 and itl["allowed"] == "<= 1.50"

    markdown = (tmp_path / "ci.md").read_text()
    assert markdown == printed.rstrip("\n") or markdown in printed
    assert f"### reference: {normal}" in markdown and f"### candidate: {slowed}" in markdown
    assert "| TTFT |" in markdown and "Verdict: **FAIL: " in markdown and "| itl_p50_ms |" in markdown
    assert png_size(tmp_path / "ci-latency-cdf.png") == (1600, 340)
    assert png_size(tmp_path / "ci-throughput.png") == (800, 340)
