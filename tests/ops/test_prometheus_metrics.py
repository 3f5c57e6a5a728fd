"""TesseraMetrics: values move by exactly what the engine served; vLLM's names, buckets, labels."""

import asyncio
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ops.metrics import INTER_TOKEN_BUCKETS, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS, TesseraMetrics
from runtime.async_engine import AsyncEngine
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.request import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)
MODEL = "tiny-llama"


def scrape(metrics: TesseraMetrics) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels without model_name) -> value, parsed from render()."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = dict(s.labels)
            assert labels.pop("model_name") == MODEL, s
            out[s.name, tuple(sorted(labels.items()))] = s.value
    return out


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted((k, str(v)) for k, v in labels.items())))
    return after[key] - before.get(key, 0.0)


@pytest.fixture(scope="module")
def engine(checkpoint):
    config = EngineConfig(block_size=4, num_blocks=64, max_num_seqs=4, max_num_batched_tokens=32, token_buckets=(4, 32))
    return Engine.from_model_dir(checkpoint("llama"), config=config)


def _serve(engine: Engine, metrics: TesseraMetrics, prompt: list[int], max_tokens: int, request_id: str):
    """Run one request alone, reporting to metrics as AsyncEngine's loop does."""
    engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, **GREEDY), request_id=request_id)
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                metrics.on_request_finished(out.timings, out.timings.finished_reason)
                final = out
        metrics.on_step(engine.stats(), engine.counters.last_step_tokens)
    return final


def test_an_engine_run_moves_every_metric_by_what_it_served(engine):
    metrics = TesseraMetrics(MODEL)
    first = [301, 302, 303, 304, 305, 306, 307, 308, 309, 310]  # 10 tokens: 2 full pages + 2
    second = first[:8] + [401, 402]  # shares the 2 full pages with `first`
    metrics.on_step(engine.stats(), 0)  # counters start from what this engine served before
    before = scrape(metrics)
    a = _serve(engine, metrics, first, 5, "m-first")
    b = _serve(engine, metrics, second, 5, "m-second")
    after = scrape(metrics)

    assert delta(before, after, "tessera:prompt_tokens_total") == 20
    assert delta(before, after, "tessera:generation_tokens_total") == 10
    assert delta(before, after, "tessera:prefix_cache_queries_total") == 20
    assert delta(before, after, "tessera:prefix_cache_hits_total") == 8
    assert delta(before, after, "tessera:num_preemptions_total") == 0
    assert delta(before, after, "tessera:request_success_total", finished_reason="length") == 2
    assert delta(before, after, "tessera:request_success_total", finished_reason="stop") == 0
    assert delta(before, after, "tessera:request_success_total", finished_reason="abort") == 0
    # Steps: a 10-token prefill, 4 decodes; a 2-token prefill (8 cached), 4 decodes.
    assert delta(before, after, "tessera:iteration_tokens_total_count") == 10
    assert delta(before, after, "tessera:iteration_tokens_total_sum") == 10 + 4 + 2 + 4
    assert delta(before, after, "tessera:iteration_tokens_total_bucket", le="1.0") == 8
    assert delta(before, after, "tessera:iteration_tokens_total_bucket", le="8.0") == 9
    assert delta(before, after, "tessera:iteration_tokens_total_bucket", le="16.0") == 10
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(before, after, f"tessera:{name}_count") == 2
    assert delta(before, after, "tessera:inter_token_latency_seconds_count") == 4 + 4
    ttft = a.timings.first_token_time - a.timings.arrival_time + b.timings.first_token_time - b.timings.arrival_time
    assert delta(before, after, "tessera:time_to_first_token_seconds_sum") == pytest.approx(ttft)
    e2e = a.timings.finished_time - a.timings.arrival_time + b.timings.finished_time - b.timings.arrival_time
    assert delta(before, after, "tessera:e2e_request_latency_seconds_sum") == pytest.approx(e2e)
    itl = sum(a.timings.inter_token_seconds) + sum(b.timings.inter_token_seconds)
    assert delta(before, after, "tessera:inter_token_latency_seconds_sum") == pytest.approx(itl)
    # Idle again: gauges at rest.
    assert after["tessera:num_requests_running", ()] == 0
    assert after["tessera:num_requests_waiting", ()] == 0
    assert after["tessera:kv_cache_usage_perc", ()] == 0.0


def test_request_timings_are_ordered_and_counted(engine):
    out = _serve(engine, TesseraMetrics(MODEL), [7, 8, 9, 10, 11, 12], 4, "timed")
    t = out.timings
    assert t.arrival_time <= t.first_scheduled_time <= t.first_token_time <= t.last_token_time <= t.finished_time
    assert (t.num_prompt_tokens, t.num_cached_tokens, t.num_generation_tokens, t.num_preemptions) == (6, 0, 4, 0)
    assert len(t.token_times) == 4 and t.token_times[0] == t.first_token_time and t.token_times[-1] == t.last_token_time
    assert len(t.inter_token_seconds) == 3 and all(g >= 0 for g in t.inter_token_seconds)
    assert t.finished_reason == "length" and t.detokenize_seconds > 0


def test_engine_stats_snapshot_mid_run(engine):
    engine.config.async_scheduling = False  # in series: one step() is one step read back
    start = engine.stats()
    engine.add_request([21, 22, 23, 24, 25], SamplingParams(max_tokens=3, **GREEDY), request_id="snap-a")
    engine.add_request([31, 32, 33], SamplingParams(max_tokens=3, **GREEDY), request_id="snap-b")
    queued = engine.stats()
    assert (queued.num_requests_running, queued.num_requests_waiting) == (0, 2)
    engine.step()  # both prefills in one step: 8 tokens, on 2 + 1 pages of 4 slots
    mid = engine.stats()
    assert (mid.num_requests_running, mid.num_requests_waiting, mid.iteration_tokens) == (2, 0, 8)
    assert mid.kv_cache_usage_perc == pytest.approx(3 / 64)
    assert mid.kv_cache_fragmentation_ratio == pytest.approx((12 - 8) / 12)
    assert mid.prompt_tokens - start.prompt_tokens == 8
    assert mid.generation_tokens - start.generation_tokens == 2
    assert mid.prefix_cache_queries - start.prefix_cache_queries == 8
    engine.run_to_completion()
    assert engine.stats().kv_cache_usage_perc == 0.0
    engine.config.async_scheduling = True


def test_async_engine_reports_steps_finished_and_aborted_requests(engine):
    metrics = TesseraMetrics(MODEL)
    metrics.on_step(engine.stats(), 0)  # counters start from what this engine served before (earlier tests)
    front = AsyncEngine(engine, metrics=metrics)

    async def run():
        async def complete(prompt, n):
            return [o async for o in front.generate(prompt, SamplingParams(max_tokens=n, **GREEDY))]

        async def leave_after_one():
            stream = front.generate([61, 62, 63], SamplingParams(max_tokens=200, **GREEDY), request_id="leaver")
            async for _ in stream:
                break
            await stream.aclose()

        before = scrape(metrics)
        done = await asyncio.gather(complete([41, 42, 43, 44], 3), complete([51, 52], 4), leave_after_one())
        for _ in range(200):  # the abort is applied on the loop thread
            if delta(before, scrape(metrics), "tessera:request_success_total", finished_reason="abort") == 1:
                break
            await asyncio.sleep(0.01)
        return before, done

    try:
        before, done = asyncio.run(run())
    finally:
        front.shutdown()
    after = scrape(metrics)
    assert delta(before, after, "tessera:request_success_total", finished_reason="length") == 2
    assert delta(before, after, "tessera:request_success_total", finished_reason="abort") == 1
    leaver_tokens = after["tessera:generation_tokens_total", ()] - before.get(("tessera:generation_tokens_total", ()), 0) - 7
    assert leaver_tokens >= 1
    assert delta(before, after, "tessera:prompt_tokens_total") == 4 + 2 + 3
    assert delta(before, after, "tessera:time_to_first_token_seconds_count") == 3  # the leaver had its first token
    assert delta(before, after, "tessera:inter_token_latency_seconds_count") == 2 + 3 + (leaver_tokens - 1)
    assert after["tessera:num_requests_running", ()] == 0  # reported after the abort, with no step after it
    assert after["tessera:kv_cache_usage_perc", ()] == 0.0
    assert [o.finished for o in done[0]] == [False, False, True]


def test_vllm_bucket_boundaries_and_labels():
    plan = {"attention": "pallas", "linear": "xla", "fused": "true", "layout": "dense", "dtype": "bfloat16"}
    metrics = TesseraMetrics(MODEL, cache_config={"block_size": "16", "num_gpu_blocks": "512"}, backend="cpu",
                             execution_plan=plan)
    samples = scrape(metrics)

    def bounds(name):
        return [dict(labels)["le"] for (n, labels) in samples if n == f"tessera:{name}_bucket"]

    assert bounds("time_to_first_token_seconds") == [str(float(b)) for b in TTFT_BUCKETS] + ["+Inf"]
    assert bounds("inter_token_latency_seconds") == [str(float(b)) for b in INTER_TOKEN_BUCKETS] + ["+Inf"]
    assert bounds("e2e_request_latency_seconds") == [str(float(b)) for b in REQUEST_LATENCY_BUCKETS] + ["+Inf"]
    assert bounds("request_queue_time_seconds") == bounds("e2e_request_latency_seconds")
    assert len(TTFT_BUCKETS) == 22 and len(INTER_TOKEN_BUCKETS) == 19 and len(REQUEST_LATENCY_BUCKETS) == 21
    assert samples["tessera:cache_config_info", (("block_size", "16"), ("num_gpu_blocks", "512"))] == 1
    assert samples["tessera:backend_mode", (("backend", "cpu"),)] == 1
    assert samples["tessera:execution_plan", tuple(sorted(plan.items()))] == 1
    assert {n for (n, _) in samples if n.startswith("tessera:request_success")} == {
        "tessera:request_success_total", "tessera:request_success_created"}
    metrics.set_backend("gpu")
    samples = scrape(metrics)
    assert samples["tessera:backend_mode", (("backend", "cpu"),)] == 0
    assert samples["tessera:backend_mode", (("backend", "gpu"),)] == 1
    # Two instances never share a registry.
    TesseraMetrics(MODEL).num_requests_running.set(5)
    assert scrape(metrics)["tessera:num_requests_running", ()] == 0


def test_counters_follow_cumulative_stats_and_a_new_engine():
    metrics = TesseraMetrics(MODEL)

    def stats(prompt_tokens, preemptions=0):
        return SimpleNamespace(num_requests_running=1, num_requests_waiting=3, kv_cache_usage_perc=0.25,
                               kv_cache_fragmentation_ratio=0.5, prefix_cache_queries=0, prefix_cache_hits=0,
                               num_preemptions=preemptions, prompt_tokens=prompt_tokens, generation_tokens=0)

    metrics.on_step(stats(100, 2), 0)
    metrics.on_step(stats(130, 2), 30)
    metrics.on_step(stats(12), 12)  # a restarted engine counts from zero again
    samples = scrape(metrics)
    assert samples["tessera:prompt_tokens_total", ()] == 142
    assert samples["tessera:num_preemptions_total", ()] == 2
    assert samples["tessera:iteration_tokens_total_count", ()] == 2  # step_tokens=0 is no step
    assert samples["tessera:num_requests_waiting", ()] == 3
    assert samples["tessera:kv_cache_fragmentation_ratio", ()] == 0.5


def test_device_memory_only_where_the_device_reports_it():
    metrics = TesseraMetrics(MODEL)
    assert metrics.update_device_memory() is None  # the CPU backend reports nothing
    assert not [n for (n, _) in scrape(metrics) if "device_memory" in n]
    # Keys as jax 0.11.2 reported them on an H100 (a subset).
    gpu = SimpleNamespace(memory_stats=lambda: {"bytes_in_use": 1000, "peak_bytes_in_use": 4000,
                                                "bytes_limit": 80 * 2**30, "num_allocs": 7, "largest_alloc_size": 512})
    metrics.update_device_memory(gpu)
    memory = {dict(labels)["kind"]: v for (n, labels), v in scrape(metrics).items() if n == "tessera:device_memory_bytes"}
    assert memory == {"in_use": 1000, "peak_in_use": 4000, "limit": 80 * 2**30}
