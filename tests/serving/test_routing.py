"""The router's choices and the autoscale hints, in plain Python (no I/O)."""

from __future__ import annotations

from runtime.block_manager import BlockStored
from serving.autoscale import WorkerLoad, hints
from serving.registry import PoolConfig
from serving.routing import Router, WorkerView, prompt_block_keys


def _router(*views: WorkerView, **pools: PoolConfig) -> Router:
    router = Router()
    router.workers = {v.worker_id: v for v in views}
    router.pools = dict(pools)
    return router


def test_a_worker_holding_the_prompts_prefix_wins_over_an_idle_one():
    ids = list(range(64))  # four blocks of 16
    keys = prompt_block_keys(ids, 16, "demo")
    warm, cold = WorkerView("warm", healthy=True, in_flight=1), WorkerView("cold", healthy=True)
    warm.apply(BlockStored(tuple(keys[:3]), b"", (), 16))
    router = _router(warm, cold)
    assert router.cost(warm, 64, keys) == 16 + 16 * 1  # one uncached block, one running request
    assert router.cost(cold, 64, keys) == 64
    assert router.pick(64, keys).worker_id == "warm"
    assert router.pick(64, keys, exclude={"warm"}).worker_id == "cold"


def test_pool_weights_3_to_1_split_every_four_picks_and_drain_empties_a_pool():
    router = _router(WorkerView("a1", pool="a", healthy=True), WorkerView("b1", pool="b", healthy=True),
                     a=PoolConfig(3), b=PoolConfig(1))
    picks = [router.pick(8, []).pool for _ in range(400)]
    assert picks.count("a") == 300 and picks.count("b") == 100
    router.pools["b"] = PoolConfig(1, drain=True)
    assert {router.pick(8, []).pool for _ in range(20)} == {"a"}
    router.workers["a1"].healthy = False
    assert router.pick(8, []) is None


def test_autoscale_hints_scale_on_saturation_and_fail_closed_when_stale():
    fresh = [WorkerLoad(f"w{i}", "p", 8, 4, 8, 0.5, 0.1) for i in range(2)]  # saturation 1.5 each
    body = hints(fresh, target=0.75, stale_after_s=3.0)
    assert body["pools"]["p"] == {"replicas": 2, "saturation": 1.5, "queue_depth": 8, "desired_replicas": 4,
                                  "stale": False}
    idle_but_stale = [WorkerLoad("w0", "p", 0, 0, 8, 0.0, 0.1), WorkerLoad("w1", "p", 0, 0, 8, 0.0, 9.0)]
    body = hints(idle_but_stale, target=0.75, stale_after_s=3.0)
    assert body["pools"]["p"]["stale"] and body["pools"]["p"]["desired_replicas"] == 2  # not 1: no scale-down
    assert body["workers"]["w1"]["stale"] and not body["workers"]["w0"]["stale"]


def test_a_worker_on_its_cpu_fallback_takes_requests_only_when_no_other_can():
    ids = list(range(64))
    keys = prompt_block_keys(ids, 16, "demo")
    degraded = WorkerView("degraded", pool="a", healthy=True, degraded=True)
    degraded.apply(BlockStored(tuple(keys), b"", (), 16))  # holds the whole prefix: cheaper, still avoided
    busy = WorkerView("busy", pool="b", healthy=True, in_flight=3)
    router = _router(degraded, busy, a=PoolConfig(3), b=PoolConfig(1))
    assert {router.pick(64, keys).worker_id for _ in range(8)} == {"busy"}
    assert router.pick(64, keys, exclude={"busy"}).worker_id == "degraded"
    degraded.degraded = False  # its accelerator is back
    assert router.pick(64, keys).worker_id == "degraded"
