"""tessera replay without a server: trace reading, slicing, prompts, metrics, the regression check, CLI errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from perf.load import Stream
from perf.replay import compare, metrics, trace
from perf.replay.client import Outcome, Target
from serving.cli import main as tessera

# Excerpts of the real traces, committed (perf/traces/README.md): the first minute of Azure's
# conversation trace, the first 40 lines of Mooncake's.
TRACES = Path(__file__).resolve().parents[2] / "perf" / "traces"
AZURE = TRACES / "azure-conv-first-minute.csv"
MOONCAKE = TRACES / "mooncake-conv-head.jsonl"


def test_azure_trace_is_read_with_times_from_the_first_request():
    requests = trace.load(AZURE)
    assert len(requests) == 191
    assert requests[0] == trace.TraceRequest(0.0, 374, 44)
    assert requests[1] == trace.TraceRequest(4.314579, 396, 109)


def test_a_slice_is_windowed_sped_up_and_clipped():
    chosen = trace.select(trace.load(AZURE), trace.Slice(duration_s=60, speed=4, clip_context=128, clip_output=16))
    assert trace.describe(chosen) == dict(requests=191, input_tokens=20800, output_tokens=3047, span_s=14.99838,
                                          with_prefix_blocks=0)
    assert all(r.input_tokens + r.output_tokens <= 128 and r.output_tokens <= 16 for r in chosen)
    assert chosen[1].arrival_s == pytest.approx(4.314579 / 4)


def test_mooncake_blocks_become_shared_prefixes():
    requests = trace.load(MOONCAKE)
    assert (requests[0].input_tokens, requests[0].hash_ids[:3], requests[-1].arrival_s) == (6758, (0, 1, 2), 12.0)
    first, second = trace.prompt_tokens(requests[0], 0), trace.prompt_tokens(requests[1], 1)
    assert len(first) == 6758 and len(second) == 7322
    # Both start with block 0 and nothing else in common: exactly 512 shared leading tokens.
    assert first[:512] == second[:512] and first[512:1024] != second[512:1024]
    assert trace.prompt_tokens(requests[0], 0) == first  # deterministic
    assert all(10 <= t < 1000 for t in first)
    assert trace.ideal_prefix_reuse(requests[:2]) == pytest.approx(512 / (6758 + 7322))


def test_requests_without_blocks_share_nothing():
    a, b = trace.TraceRequest(0, 100, 5), trace.TraceRequest(1, 100, 5)
    assert trace.prompt_tokens(a, 0)[:10] != trace.prompt_tokens(b, 1)[:10]
    assert trace.prompt_tokens(a, 0, token_range=(5, 6)) == [5] * 100


def test_clip_keeps_one_output_and_one_prompt_token():
    window = trace.Slice(clip_context=2, clip_output=8)
    assert trace.select([trace.TraceRequest(0, 900, 0)], window) == [trace.TraceRequest(0, 1, 1)]


@pytest.mark.parametrize("window, message", [
    (dict(speed=0), "--speed"), (dict(clip_context=1), "--clip-context"), (dict(clip_output=0), "--clip-output"),
    (dict(duration_s=-1), "--duration"),
])
def test_bad_slices_are_refused(window, message):
    with pytest.raises(ValueError, match=message):
        trace.Slice(**window)


def test_bad_trace_files_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="unknown trace format"):
        trace.load(_write(tmp_path / "t.txt", "x"))
    with pytest.raises(ValueError, match=r"t.jsonl:2: not a Mooncake trace line"):
        trace.load(_write(tmp_path / "t.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"a": 1}\n'))
    with pytest.raises(ValueError, match="not an Azure trace"):
        trace.load(_write(tmp_path / "t.csv", "a,b\n1,2\n"))
    with pytest.raises(FileNotFoundError):
        trace.load(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="no requests in the trace between 100 s"):
        trace.select([trace.TraceRequest(0, 5, 1)], trace.Slice(start_s=100))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- metrics ---------------------------------------------------------------------------------


def _outcome(index, start, chunks, tokens, ok=True, input_tokens=10):
    stream = Stream(ok=ok, start=100.0 + start, chunk_times=[100.0 + t for t in chunks], tokens=tokens,
                    error="" if ok else "HTTP 429")
    return Outcome(index, start, input_tokens, tokens, stream, 100.0)


def test_metrics_follow_vllm_definitions():
    outcomes = [
        _outcome(0, 0.0, [0.1, 0.2, 0.3, 0.5], 4),  # TTFT 100 ms, E2EL 500 ms, TPOT (500-100)/3
        _outcome(1, 1.0, [1.3, 1.5], 2),  # TTFT 300 ms, E2EL 500 ms, TPOT 200 ms
        _outcome(2, 2.0, [2.2], 1),  # one token: no TPOT
        _outcome(3, 2.0, [], 0, ok=False),
    ]
    m = metrics.summarise(outcomes, duration_s=2.0, slos=metrics.parse_slos(["ttft:250", "tpot:150"]))
    assert (m["requests"], m["completed"], m["errors"], m["output_tokens"], m["input_tokens"]) == (4, 3, 1, 7, 30)
    assert m["request_throughput"] == 1.5 and m["output_throughput"] == 3.5 and m["total_token_throughput"] == 18.5
    assert m["ttft"]["p50_ms"] == pytest.approx(200.0) and m["ttft"]["mean_ms"] == pytest.approx(200.0)
    assert m["tpot"]["count"] == 2 and m["tpot"]["mean_ms"] == pytest.approx((400 / 3 + 200) / 2)
    assert m["itl"]["count"] == 4 and m["itl"]["p50_ms"] == pytest.approx(150.0)
    assert m["e2el"]["p90_ms"] == pytest.approx(500.0)
    # Request 0 meets both SLOs; 1 misses TTFT; 2 has no TPOT, so it cannot meet a TPOT SLO.
    assert m["good_requests"] == 1 and m["goodput"] == 0.5
    assert m["first_errors"] == ["HTTP 429"]


def test_throughput_series_spreads_tokens_over_chunks():
    series = metrics.throughput_series([_outcome(0, 0.0, [0.5, 1.5], 4)], duration_s=2.0)
    assert series["output_tok_s"] == [2.0, 2.0] and series["sent_req_s"] == [1.0, 0.0]


@pytest.mark.parametrize("bad", ["ttft", "foo:5", "ttft:x", "tpot:0"])
def test_bad_slos_are_refused(bad):
    with pytest.raises(ValueError, match="--goodput"):
        metrics.parse_slos([bad])


# -- the regression check --------------------------------------------------------------------


def _run(ttft=100.0, tpot=10.0, itl=10.0, e2el=700.0, tput=100.0):
    lat = lambda v: dict(p50_ms=v, p90_ms=v * 1.5)  # noqa: E731
    return dict(ttft=lat(ttft), tpot=lat(tpot), itl=lat(itl), e2el=lat(e2el), output_throughput=tput)


def _baseline(tolerance=0.25):
    workload = dict(trace="t.csv", start_s=0.0, duration_s=60.0, speed=2.0, clip_context=128, clip_output=16,
                    max_requests=None, block_tokens=512)
    return compare.make_baseline("epyc", "AMD EPYC", workload, _run(), tolerance)


def test_within_tolerance_passes_and_beyond_it_fails():
    baseline = _baseline()
    ok = compare.compare(_run(ttft=120, tput=85), _run(), baseline, "b.json", "other cpu")
    assert ok["regressed"] == [] and ok["basis"] == "ratio to the reference run in this invocation"
    bad = compare.compare(_run(itl=13, tput=75), _run(), baseline, "b.json", "other cpu")
    assert bad["regressed"] == ["itl_p50_ms", "output_throughput"]
    row = next(r for r in bad["rows"] if r["metric"] == "itl_p50_ms")
    assert (row["ratio"], row["allowed"]) == (pytest.approx(1.3), "<= 1.25")


def test_ratios_cancel_a_slower_machine():
    # Everything twice as slow on another machine: no regression against its own reference run.
    slow = _run(ttft=200, tpot=20, itl=20, e2el=1400, tput=50)
    assert compare.compare(slow, slow, _baseline(), "b.json", "other cpu")["regressed"] == []


def test_without_a_reference_run_the_baseline_needs_its_own_machine():
    with pytest.raises(ValueError, match="pass --reference-url"):
        compare.compare(_run(), None, _baseline(), "b.json", "Intel Xeon")
    assert compare.compare(_run(ttft=200), None, _baseline(), "b.json", "AMD EPYC")["regressed"] == ["ttft_p50_ms"]


def test_more_errors_than_the_reference_is_a_regression():
    result = compare.compare(_run(), _run(), _baseline(), "b.json", "x", candidate_errors=2, reference_errors=0)
    assert result["regressed"] == ["errors"]


def test_a_baseline_for_another_workload_is_refused(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps(_baseline()))
    baseline = compare.load_baseline(path)
    with pytest.raises(ValueError, match="speed: baseline 2.0, this run 4.0"):
        compare.check_workload(baseline, {**baseline["workload"], "speed": 4.0}, str(path))
    path.write_text(json.dumps({"tolerance": {}}))
    with pytest.raises(ValueError, match="lacks cpu_model"):
        compare.load_baseline(path)


def test_the_shipped_baselines_load():
    for path in Path("perf/baselines").glob("*.json"):
        baseline = compare.load_baseline(path)
        assert set(baseline["reference"]) == set(compare.METRICS) and not math.isnan(baseline["reference"]["itl_p50_ms"])


# -- the command line ------------------------------------------------------------------------


def test_target_urls():
    target = Target.parse("https://gw.example:8443/base/", "k")
    assert (target.host, target.port, target.path, target.tls) == ("gw.example", 8443, "/base/v1/completions", True)
    assert target.headers == {"Authorization": "Bearer k"}
    with pytest.raises(ValueError, match="must be an http"):
        Target.parse("localhost:8000")


@pytest.mark.parametrize("argv, message", [
    (["replay", "missing.csv"], "trace missing.csv does not exist"),
    (["replay", str(AZURE), "--speed", "0"], "--speed must be > 0"),
    (["replay", str(AZURE), "--goodput", "ttft"], "--goodput 'ttft'"),
    (["replay", str(AZURE), "--token-range", "9:3"], "--token-range '9:3'"),
    (["replay", str(AZURE), "--url", "ftp://x"], "must be an http"),
    (["replay", str(AZURE), "--compare", "nothing.json"], "baseline nothing.json does not exist"),
    (["replay", str(AZURE), "--duration", "1", "--url", "http://127.0.0.1:9"], "server http://127.0.0.1:9 does not answer"),
])
def test_bad_input_gets_a_clear_error(argv, message, capsys, tmp_path):
    assert tessera([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_the_prepared_slice_round_trips_as_mooncake_jsonl(tmp_path):
    chosen = trace.select(trace.load(MOONCAKE), trace.Slice(duration_s=10, speed=2, clip_context=600, clip_output=50))
    trace.write_mooncake(chosen, tmp_path / "slice.jsonl")
    again = trace.load(tmp_path / "slice.jsonl")
    assert [(r.input_tokens, r.output_tokens) for r in again] == [(r.input_tokens, r.output_tokens) for r in chosen]
    assert [r.arrival_s for r in again] == pytest.approx([r.arrival_s for r in chosen], abs=1e-3)  # written in whole ms
    assert all(len(r.hash_ids) == 2 for r in again)  # 550 prompt tokens at most: two 512-token blocks


def test_the_json_report_is_strict(tmp_path):
    from perf.replay import report

    report.write_json({"ttft": {"p50_ms": math.nan}, "ratio": math.inf, "ok": [1.5]}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"ttft": {"p50_ms": None}, "ratio": None, "ok": [1.5]}
