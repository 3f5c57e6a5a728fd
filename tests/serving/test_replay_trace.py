"""perf/kv_routing_replay.py's mapping of the Mooncake trace to prompts: shared hash ids are
shared whole KV blocks, clipped to the demo model's context, and the hit-rate bound is exact."""

from __future__ import annotations

import json

from perf.kv_routing_replay import (MAX_HASHES, MAX_OUTPUT, TOKENS_PER_HASH, TraceRequest, hash_tokens,
                                    ideal_hit_rate, load_trace, shared_root_rate)
from serving.routing import prompt_block_keys


def test_equal_hash_ids_give_equal_block_keys_and_different_ones_differ():
    a = TraceRequest((0, 1, 2), 4).prompt()
    b = TraceRequest((0, 1, 9), 4).prompt()
    assert len(a) == 3 * TOKENS_PER_HASH and hash_tokens(1) == hash_tokens(1)
    keys_a, keys_b = (prompt_block_keys(p, 16, "demo") for p in (a, b))
    shared = 2 * TOKENS_PER_HASH // 16
    assert keys_a[:shared] == keys_b[:shared] and keys_a[shared] != keys_b[shared]


def test_trace_lines_are_clipped_to_the_context(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"timestamp": 0, "input_length": 9000, "output_length": 500, "hash_ids": list(range(18))},
        {"timestamp": 5, "input_length": 700, "output_length": 3, "hash_ids": [0, 40]},
    ]))
    first, second = load_trace(path, 0, 2)
    assert first == TraceRequest(tuple(range(MAX_HASHES)), MAX_OUTPUT)
    assert second == TraceRequest((0, 40), 3)
    assert len(first.prompt()) + first.output_tokens <= 256


def test_hit_rate_bound_counts_leading_hash_ids_seen_before():
    requests = [TraceRequest((0, 1, 2), 1), TraceRequest((0, 1, 3), 1), TraceRequest((0, 5), 1),
                TraceRequest((0, 1, 2, 4), 1)]
    # hits in hash ids: 0, 2 (0 1), 1 (0), 3 (0 1 2) = 6 of 12
    assert ideal_hit_rate(requests) == 6 / 12
    assert shared_root_rate(requests) == 3 / 12
