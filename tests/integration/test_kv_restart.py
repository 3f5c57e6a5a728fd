"""`tessera serve` with the disk KV tier keeps its prefix cache across restarts: after SIGTERM and
after SIGKILL (with block writes still in flight) the first request hits the cache (cached
tokens > 0) and answers exactly what it answered before.

Ready time: the requirement's 30 s from the process's start is asserted; the issue's 10 s is a
figure of perf/kv_restart.py (with the server's start-up phases), never a timed assertion on
the shared machine. What makes a restart fast is asserted instead: it compiles nothing, every
program its start-up needs comes from the persistent compilation cache."""

import signal
import time

from tests.helpers.kv_restart import (complete, complete_all, metric, prompts, start_serve, stop,
                                      wait_for_disk_writes)

REQUIRED_READY_S = 30.0  # the mission's figure; the 10 s aim is measured by perf/kv_restart.py, not here
# jax logs each program it compiles and whether the persistent cache had it; the server its
# start-up summary (info), which follows every program start-up needs.
LOG_COMPILES = {"JAX_LOG_COMPILES": "1", "TESSERA_LOG_LEVEL": "info"}


def _check_ready(seconds: float) -> None:
    assert seconds < REQUIRED_READY_S, f"ready after {seconds:.1f}s"


def _check_nothing_compiled(handle) -> None:
    """A restart loads every program its start-up needs (the step's buckets, the weight layout,
    the page transfers of the KV tiers) from the persistent cache: nothing compiles."""
    deadline = time.monotonic() + 30  # the thread reading the server's output may trail /ready
    while "start-up: ready" not in handle.output:
        assert time.monotonic() < deadline, handle.output[-4000:]
        time.sleep(0.05)
    start_up = handle.output.split("start-up: ready")[0]
    programs = start_up.count("Finished XLA compilation of")
    assert programs >= 19 and start_up.count("Persistent compilation cache hit for") == programs


def test_the_prefix_cache_survives_sigterm_and_sigkill(tmp_path):
    kv_dir = tmp_path / "kv"
    batch = prompts()  # 5 prefixes of 192 tokens, 10 tails of 8 each
    fresh = prompts(num_prefixes=2, per_prefix=1, seed=1)  # prefixes the first server never saw

    # 1. Fifty prompts: one per prefix first, then the other 45 eight at a time, each finding its
    #    prefix's 12 pages cached. Stopped with SIGTERM (drained, writes flushed).
    handle, url, _ = start_serve(kv_dir)
    try:
        firsts = list(range(0, 50, 10))
        rest = [i for i in range(50) if i not in firsts]
        answers = dict(zip(firsts, complete_all(url, [batch[i] for i in firsts])))
        answers |= dict(zip(rest, complete_all(url, [batch[i] for i in rest])))
        assert [answers[i][1] for i in range(50)] == [0 if i % 10 == 0 else 192 for i in range(50)]
        # 200-token prompts in pages of 16: 12 full pages each, all the shared prefix's (tail and
        # outputs reach 207 computed tokens: the 13th page is never full).
        assert metric(url, "tessera:prefix_cache_hits_total") / metric(url, "tessera:prefix_cache_queries_total") \
            == 45 * 192 / (50 * 200)
        wait_for_disk_writes(url)
        assert metric(url, "tessera:kv_tier_blocks", tier="disk") == 60
    finally:
        assert stop(handle, signal.SIGTERM) == 0

    # 2. After SIGTERM: the first request loads its 12 pages from disk and answers the same.
    handle, url, ready_s = start_serve(kv_dir, env=LOG_COMPILES)
    try:
        _check_nothing_compiled(handle)
        assert metric(url, "tessera:kv_tier_blocks", tier="disk") == 60  # restored, every checksum good
        assert complete(url, batch[15]) == (answers[15][0], 192)
        assert metric(url, "tessera:kv_tier_loads_total", tier="disk") == 12
        assert complete(url, batch[17]) == (answers[17][0], 192)  # the same prefix: now a device hit
        assert metric(url, "tessera:kv_tier_loads_total", tier="disk") == 12
        assert complete(url, batch[3][:100] + [11, 12, 13])[1] == 96  # a new tail: 6 full shared pages
        first_fresh = complete(url, fresh[0])
        wait_for_disk_writes(url)  # fresh[0]'s 12 pages are committed ...
        pending = complete(url, fresh[1])  # ... fresh[1]'s are being written when the kill comes
    finally:
        assert stop(handle, signal.SIGKILL) == -signal.SIGKILL
    _check_ready(ready_s)

    # 3. After SIGKILL: what was committed is served from disk; a block the kill tore is dropped,
    #    never loaded; every answer is exactly the one before.
    handle, url, ready_s = start_serve(kv_dir, env=LOG_COMPILES)
    try:
        _check_nothing_compiled(handle)
        restored = metric(url, "tessera:kv_tier_blocks", tier="disk")
        dropped = metric(url, "tessera:kv_tier_dropped_total", tier="disk")
        assert 72 <= restored <= 84 and dropped == 0  # rows are committed only after their files are synced
        assert complete(url, fresh[0][:-8] + [21, 22])[1] == 192
        assert complete(url, fresh[0]) == (first_fresh[0], 192)
        text, cached = complete(url, fresh[1])
        assert text == pending[0] and cached % 16 == 0 and cached == 16 * (restored - 72)
        assert complete(url, batch[40]) == (answers[40][0], 192)
    finally:
        assert stop(handle, signal.SIGTERM) == 0
    _check_ready(ready_s)
