"""The KV tiers with a real engine: pages copied off the device as they are cached, loaded back
on a prefix hit after the device evicted them or after a restart, giving the same tokens."""

import numpy as np
import pytest

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.kv_tiers import KvTierConfig
from runtime.request import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PREFIX = list(range(3, 3 + 40))  # 5 full pages of 8


def _engine(checkpoint, tmp_path, num_blocks=16, async_scheduling=True) -> Engine:
    config = EngineConfig(block_size=8, num_blocks=num_blocks, max_num_seqs=2, max_num_batched_tokens=32,
                          max_model_len=96, token_buckets=(32,), model_id="tiers", async_scheduling=async_scheduling,
                          kv_tiers=KvTierConfig(str(tmp_path / "kv"), "digest-1"))
    return Engine.from_model_dir(checkpoint("llama"), config=config)  # compiled on first use: one bucket


def _run(engine: Engine, prompt: list[int]) -> tuple[list[int], int]:
    request = engine.add_request(prompt, GREEDY)
    tokens, cached = [], 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == request.request_id:
                tokens += [t for o in out.outputs for t in o.token_ids]
                cached = out.num_cached_tokens
    return tokens, cached


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["overlapped", "series"])
def test_a_restarted_engine_hits_the_disk_tier_and_answers_the_same(checkpoint, tmp_path, async_scheduling):
    first = _engine(checkpoint, tmp_path, async_scheduling=async_scheduling)
    cold, cached = _run(first, PREFIX + [50, 51])
    assert cached == 0
    warm, cached = _run(first, PREFIX + [50, 51])
    assert (warm, cached) == (cold, 40)  # a device hit
    stats = dict(first.stats().kv_tiers)
    assert stats["host"].blocks == 5  # the prompt's 5 full pages (6 output tokens fill none more)
    first.close()

    second = _engine(checkpoint, tmp_path, async_scheduling=async_scheduling)
    events = second.blocks.take_events()
    assert len(events) == 5 and all(len(e.keys) == 1 for e in events)  # re-advertised from disk
    again, cached = _run(second, PREFIX + [50, 51])
    assert (again, cached) == (cold, 40)
    stats = dict(second.stats().kv_tiers)
    assert (stats["disk"].loads, stats["disk"].hits, stats["host"].loads) == (5, 5, 0)
    other, cached = _run(second, PREFIX[:16] + [60, 61, 62])  # a shorter shared prefix: now on the device
    assert cached == 16
    assert dict(second.stats().kv_tiers)["disk"].loads == 5
    second.close()


def test_pages_evicted_from_the_device_come_back_from_the_host_byte_for_byte(checkpoint, tmp_path):
    engine = _engine(checkpoint, tmp_path, num_blocks=8)
    cold, _ = _run(engine, PREFIX + [50])
    pages = {k: engine.blocks._cached[k] for k in list(engine.blocks._cached)}
    before = {k: engine.runner.read_pages([p])[0] for k, p in pages.items()}
    _run(engine, list(range(200, 256)))  # 8 pages with its output: every page of the first prompt goes
    assert not set(pages) & set(engine.blocks._cached)
    again, cached = _run(engine, PREFIX + [50])
    assert (again, cached) == (cold, 40)
    assert dict(engine.stats().kv_tiers)["host"].loads == 5
    for key, data in before.items():
        np.testing.assert_array_equal(engine.runner.read_pages([engine.blocks._cached[key]])[0], data)
    engine.close()


def test_the_pending_writes_gauge_follows_the_disk_tier_while_the_engine_is_idle(checkpoint, tmp_path):
    """The disk tier commits in its own thread, often after the request's last step: the metrics
    must still reach 0 pending writes with no further step (a client waits on that gauge)."""
    import asyncio
    import threading
    import time

    from ops.metrics import TesseraMetrics
    from runtime.async_engine import AsyncEngine

    engine = _engine(checkpoint, tmp_path)
    disk = engine.kv_tiers.disk
    held, write_batch = threading.Event(), disk._write_batch
    disk._write_batch = lambda batch: (held.wait(60), write_batch(batch))  # commits wait until released
    metrics = TesseraMetrics("tiers", cache_config=engine.cache_config_info())
    front = AsyncEngine(engine, metrics=metrics)
    front.start()

    async def complete():
        async for _ in front.stream(front.make_request(PREFIX + [50, 51], GREEDY)):
            pass

    def pending() -> float:
        return metrics.registry.get_sample_value("tessera:kv_tier_pending_writes", {"model_name": "tiers"})

    try:
        asyncio.run(complete())
        assert pending() == 5  # the prompt's pages, queued
        held.set()  # committed now, while no request runs
        deadline = time.monotonic() + 30
        while pending() != 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pending() == 0
    finally:
        held.set()
        front.shutdown()
        engine.close()
