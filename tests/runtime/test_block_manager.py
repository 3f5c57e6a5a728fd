"""BlockManager: prefix-cache keys, reference counts, LRU reuse and eviction, events, figures.

Plain Python, no jax: the runner is simulated by setting `num_computed_tokens` and calling
`cache_full_blocks`, as `Scheduler.postprocess` does after a step.
"""

import hashlib
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.block_manager import (
    ROOT_KEY,
    AllBlocksCleared,
    BlockManager,
    BlockRemoved,
    BlockStored,
    block_key,
)
from runtime.request import Request, SamplingParams, Sequence

REPO = Path(__file__).resolve().parents[2]
_request_ids = itertools.count()


def make_seq(tokens, *, salt: str = "", adapter: str = "") -> Sequence:
    request = Request(f"r{next(_request_ids)}", list(tokens), SamplingParams(max_tokens=8),
                      cache_salt=salt, adapter_id=adapter)
    return request.sequences[0]


def compute(bm: BlockManager, seq: Sequence, num_tokens: int, cached: list[int] = ()) -> None:
    """What one engine step does for `seq`: pages for its tokens, then the KV is there."""
    assert bm.allocate(seq, num_tokens, cached)
    seq.num_computed_tokens = num_tokens
    bm.cache_full_blocks(seq)


def ref_counts(bm: BlockManager, block_ids) -> list[int]:
    return [bm._blocks[b].ref_count for b in block_ids]


def keys_of(tokens, block_size, model_id="m", adapter="", salt="") -> list[bytes]:
    keys, parent = [], ROOT_KEY
    for i in range(len(tokens) // block_size):
        parent = block_key(parent, tokens[i * block_size : (i + 1) * block_size], model_id, adapter, salt)
        keys.append(parent)
    return keys


# -- keys ---------------------------------------------------------------------------------

_KEYS_IN_A_CHILD = """
from runtime.block_manager import ROOT_KEY, BlockManager, block_key
from runtime.request import Request, SamplingParams
print(block_key(ROOT_KEY, [1, 2, 3, 4], "m", "a", "s").hex())
bm = BlockManager(num_blocks=4, block_size=4, model_id="m")
seq = Request("x", list(range(10, 19)), SamplingParams(), cache_salt="s").sequences[0]
bm.allocate(seq, 9)
seq.num_computed_tokens = 9
bm.cache_full_blocks(seq)
print(",".join(k.hex() for e in bm.take_events() for k in e.keys))
"""


def _keys_from_child(hash_seed: str) -> list[str]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _KEYS_IN_A_CHILD], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.split()


def test_root_key_is_a_constant():
    assert ROOT_KEY == hashlib.sha256(b"tessera/prefix-cache/v1").digest()


def test_block_key_is_sha256_of_length_prefixed_fields():
    # Pinned byte for byte: keys are persisted and shared between workers.
    expected = hashlib.sha256(
        ROOT_KEY
        + (4).to_bytes(4, "little") + b"".join(t.to_bytes(4, "little") for t in (1, 2, 3, 4))
        + (1).to_bytes(4, "little") + b"m"
        + (1).to_bytes(4, "little") + b"a"
        + (1).to_bytes(4, "little") + b"s"
    ).hexdigest()
    assert block_key(ROOT_KEY, [1, 2, 3, 4], "m", "a", "s").hex() == expected
    assert block_key(ROOT_KEY, (1, 2, 3, 4), "m", "a", "s").hex() == expected  # tuple or list


def test_keys_are_equal_across_processes_and_hash_seeds():
    here = block_key(ROOT_KEY, [1, 2, 3, 4], "m", "a", "s").hex()
    chain = ",".join(k.hex() for k in keys_of(list(range(10, 19)), 4, salt="s"))
    for seed in ("0", "4242"):
        assert _keys_from_child(seed) == [here, chain]


def test_keys_are_equal_across_managers():
    tokens = list(range(100, 112))
    events = []
    for _ in range(2):
        bm = BlockManager(num_blocks=8, block_size=4, model_id="m")
        compute(bm, make_seq(tokens), 12)
        events.append(bm.take_events())
    assert events[0] == events[1]
    assert events[0][0].keys == tuple(keys_of(tokens, 4))


@pytest.mark.parametrize(
    "changed",
    [
        dict(parent=block_key(ROOT_KEY, [9], "m", "a", "s")),
        dict(token_ids=[1, 2, 3, 5]),
        dict(token_ids=[4, 3, 2, 1]),
        dict(model_id="m2"),
        dict(adapter_id="b"),
        dict(salt="t"),
    ],
)
def test_each_key_input_changes_the_key(changed):
    base = dict(parent=ROOT_KEY, token_ids=[1, 2, 3, 4], model_id="m", adapter_id="a", salt="s")
    args = {**base, **changed}
    assert block_key(**{k: args[k] for k in base}) != block_key(**base)


def test_fields_cannot_run_into_each_other():
    # Length prefixes: moving a character from one field to the next gives another key.
    assert block_key(ROOT_KEY, [1], "ab", "c", "") != block_key(ROOT_KEY, [1], "a", "bc", "")
    assert block_key(ROOT_KEY, [1], "m", "", "x") != block_key(ROOT_KEY, [1], "m", "x", "")
    assert block_key(ROOT_KEY, [1, 0], "m", "", "") != block_key(ROOT_KEY, [1], "m", "", "")


def test_salt_adapter_and_model_isolate_cache_entries():
    tokens = list(range(9))
    bm = BlockManager(num_blocks=16, block_size=4, model_id="m")
    owner = make_seq(tokens, salt="s1", adapter="lora-a")
    compute(bm, owner, 9)
    assert bm.find_cached_prefix(make_seq(tokens, salt="s1", adapter="lora-a")) == owner.block_ids[:2]
    assert bm.find_cached_prefix(make_seq(tokens, salt="s2", adapter="lora-a")) == []
    assert bm.find_cached_prefix(make_seq(tokens, salt="s1", adapter="")) == []
    other_model = BlockManager(num_blocks=16, block_size=4, model_id="m2")
    compute(other_model, make_seq(tokens), 9)
    assert other_model.take_events()[0].keys != tuple(keys_of(tokens, 4))


# -- allocation and reference counts -------------------------------------------------------


def test_allocate_takes_pages_for_the_tokens_and_free_returns_them():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(range(10))
    assert bm.allocate(seq, 10)
    assert seq.block_ids == [0, 1, 2]
    assert ref_counts(bm, seq.block_ids) == [1, 1, 1]
    assert bm.num_free_blocks == 5
    assert bm.allocate(seq, 12)  # still fits in three pages
    assert seq.block_ids == [0, 1, 2]
    assert bm.allocate(seq, 13)
    assert seq.block_ids == [0, 1, 2, 3]
    bm.free(seq)
    assert seq.block_ids == []
    assert ref_counts(bm, range(4)) == [0, 0, 0, 0]
    assert bm.num_free_blocks == 8


def test_shared_prefix_blocks_are_counted_and_freed_by_the_last_owner():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_seq(range(10))
    compute(bm, first, 10)  # pages 0, 1 full (keyed), 2 partial
    second = make_seq(range(10))
    cached = bm.find_cached_prefix(second)
    assert cached == [0, 1]
    assert bm.blocks_needed(second, 10, cached) == 1  # only the partial page is new
    compute(bm, second, 10, cached)
    assert second.block_ids == [0, 1, 3]
    assert ref_counts(bm, [0, 1, 2, 3]) == [2, 2, 1, 1]
    assert bm.num_free_blocks == 4
    bm.free(first)
    assert ref_counts(bm, [0, 1, 2, 3]) == [1, 1, 0, 1]
    assert bm.num_free_blocks == 5
    bm.free(second)
    assert bm.num_free_blocks == 8
    assert bm.num_cached_blocks == 2  # freed, still findable


def test_allocate_refuses_and_changes_nothing_when_the_pool_is_short():
    bm = BlockManager(num_blocks=3, block_size=4)
    holder = make_seq(range(8))
    compute(bm, holder, 8)
    bm.take_events()
    seq = make_seq(range(50, 58))
    assert not bm.can_allocate(seq, 8)
    assert not bm.allocate(seq, 8)
    assert seq.block_ids == []
    assert bm.num_free_blocks == 1
    assert ref_counts(bm, range(3)) == [1, 1, 0]
    assert bm.take_events() == []


def test_reviving_cached_pages_counts_against_the_pool():
    bm = BlockManager(num_blocks=3, block_size=4)
    first = make_seq(range(8))
    compute(bm, first, 8)  # pages 0 and 1, both keyed
    bm.free(first)  # pool, least recent first: 2 (never used), 1, 0
    filler = make_seq(range(90, 93))
    assert bm.allocate(filler, 3)
    assert filler.block_ids == [2]  # the unkeyed page goes first: nothing evicted
    bm.take_events()

    seq = make_seq(list(range(8)) + [70, 71, 72, 73])
    cached = bm.find_cached_prefix(seq)
    assert cached == [0, 1]
    assert bm.blocks_needed(seq, 12, cached) == 3  # two revived from the pool + one new
    assert not bm.allocate(seq, 12, cached)
    assert seq.block_ids == []
    assert bm.num_free_blocks == 2
    assert ref_counts(bm, [0, 1]) == [0, 0]
    assert bm.take_events() == []
    assert bm.allocate(seq, 8, cached)
    assert seq.block_ids == [0, 1]
    assert bm.num_free_blocks == 0


# -- prefix lookup ---------------------------------------------------------------------------


def test_find_cached_prefix_returns_the_longest_cached_full_block_prefix():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(12))
    owner = make_seq(prompt + [99])
    compute(bm, owner, 13)  # pages: 3 full (keyed) + 1 partial
    a, b, c, _ = owner.block_ids

    assert bm.find_cached_prefix(make_seq(prompt + [5, 6])) == [a, b, c]
    assert bm.find_cached_prefix(make_seq(prompt)) == [a, b]  # 12 tokens: the last one is computed again
    assert bm.find_cached_prefix(make_seq(prompt[:8])) == [a]  # exactly 2 full blocks -> 1 hit
    assert bm.find_cached_prefix(make_seq(prompt[:9])) == [a, b]
    assert bm.find_cached_prefix(make_seq(prompt[:4])) == []
    assert bm.find_cached_prefix(make_seq(prompt[:6] + [77] + prompt[7:])) == [a]  # differs in block 1
    assert bm.find_cached_prefix(make_seq([77] + prompt[1:])) == []  # differs in block 0: chain broken


def test_find_cached_prefix_only_sees_computed_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    owner = make_seq(range(12))
    assert bm.allocate(owner, 12)
    owner.num_computed_tokens = 5
    bm.cache_full_blocks(owner)
    assert bm.num_cached_blocks == 1
    assert bm.find_cached_prefix(make_seq(range(12))) == [owner.block_ids[0]]


# -- LRU pool --------------------------------------------------------------------------------


def test_freed_cached_blocks_are_reused_on_a_hit():
    bm = BlockManager(num_blocks=4, block_size=4)
    first = make_seq(range(9))
    compute(bm, first, 9)
    old = list(first.block_ids)
    bm.free(first)
    bm.take_events()
    assert bm.num_free_blocks == 4

    again = make_seq(list(range(8)) + [42])
    cached = bm.find_cached_prefix(again)
    assert cached == old[:2]
    compute(bm, again, 9, cached)
    assert again.block_ids[:2] == old[:2]
    assert bm.num_free_blocks == 1
    assert not any(isinstance(e, BlockRemoved) for e in bm.take_events())


def test_eviction_takes_the_least_recently_freed_block_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = make_seq([1, 2]), make_seq([3, 4])
    compute(bm, a, 2)  # page 0, keyed
    compute(bm, b, 2)  # page 1, keyed
    key_a, key_b = keys_of([1, 2], 2, model_id="")[0], keys_of([3, 4], 2, model_id="")[0]
    bm.free(b)  # freed before a, although allocated after it
    bm.free(a)
    bm.take_events()

    filler = make_seq(range(10, 16))
    assert bm.allocate(filler, 6)  # the two never-used pages, then the least recently freed
    assert filler.block_ids == [2, 3, 1]
    assert bm.take_events() == [BlockRemoved((key_b,))]
    assert bm.find_cached_prefix(make_seq([1, 2, 0])) == [0]
    assert bm.find_cached_prefix(make_seq([3, 4, 0])) == []


def test_a_hit_makes_a_pool_block_recent_again():
    bm = BlockManager(num_blocks=2, block_size=2)
    a, b = make_seq([1, 2]), make_seq([3, 4])
    compute(bm, a, 2)
    compute(bm, b, 2)
    bm.free(a)
    bm.free(b)  # pool: a's page, then b's
    reader = make_seq([1, 2, 9])
    compute(bm, reader, 2, bm.find_cached_prefix(reader))
    assert reader.block_ids == [0]
    bm.free(reader)  # a's page is now the most recently freed
    bm.take_events()

    filler = make_seq([7, 7])
    assert bm.allocate(filler, 2)
    assert filler.block_ids == [1]
    assert bm.take_events() == [BlockRemoved((keys_of([3, 4], 2, model_id="")[0],))]


def test_tail_blocks_of_a_freed_sequence_are_evicted_before_its_prefix():
    bm = BlockManager(num_blocks=3, block_size=2)
    prompt = [1, 2, 3, 4, 5, 6]
    seq = make_seq(prompt)
    compute(bm, seq, 6)  # pages 0, 1, 2, all keyed
    k0, k1, k2 = keys_of(prompt, 2, model_id="")
    bm.free(seq)
    bm.take_events()

    filler = make_seq([9, 9])
    assert bm.allocate(filler, 2)
    assert filler.block_ids == [2]
    assert bm.take_events() == [BlockRemoved((k2,))]
    assert bm.allocate(filler, 4)
    assert filler.block_ids == [2, 1]
    assert bm.take_events() == [BlockRemoved((k1,))]
    assert bm.find_cached_prefix(make_seq(prompt + [7])) == [0]


def test_keyless_blocks_are_reused_before_keyed_ones():
    bm = BlockManager(num_blocks=2, block_size=4)
    full, partial = make_seq([1, 2, 3, 4]), make_seq([5, 6])
    compute(bm, full, 4)  # page 0, keyed
    compute(bm, partial, 2)  # page 1, no key: not full
    bm.free(full)
    bm.free(partial)  # freed last, yet reused first: it holds nothing findable
    bm.take_events()

    filler = make_seq([9])
    assert bm.allocate(filler, 1)
    assert filler.block_ids == [1]
    assert bm.take_events() == []
    assert bm.find_cached_prefix(make_seq([1, 2, 3, 4, 0])) == [0]


# -- events ----------------------------------------------------------------------------------


def test_caching_emits_block_stored_with_parent_and_tokens():
    bm = BlockManager(num_blocks=8, block_size=4, model_id="m")
    tokens = list(range(20, 34))  # 14 tokens
    k0, k1, k2 = keys_of(tokens, 4)
    seq = make_seq(tokens)
    assert bm.allocate(seq, 14)
    seq.num_computed_tokens = 3
    bm.cache_full_blocks(seq)
    assert bm.take_events() == []  # no full block yet
    seq.num_computed_tokens = 4
    bm.cache_full_blocks(seq)
    assert bm.take_events() == [BlockStored((k0,), ROOT_KEY, (20, 21, 22, 23), 4)]
    seq.num_computed_tokens = 14
    bm.cache_full_blocks(seq)
    assert bm.take_events() == [BlockStored((k1, k2), k0, tuple(range(24, 32)), 4)]
    bm.cache_full_blocks(seq)
    assert bm.take_events() == []  # stored once


def test_a_block_already_cached_elsewhere_is_not_stored_again():
    bm = BlockManager(num_blocks=8, block_size=4, model_id="m")
    tokens = list(range(8))
    first, second = make_seq(tokens), make_seq(tokens)
    assert bm.allocate(first, 8) and bm.allocate(second, 8)  # computed side by side, no hit
    first.num_computed_tokens = second.num_computed_tokens = 8
    bm.cache_full_blocks(first)
    bm.cache_full_blocks(second)
    assert bm.take_events() == [BlockStored(tuple(keys_of(tokens, 4)), ROOT_KEY, tuple(tokens), 4)]
    assert bm.num_cached_blocks == 2
    assert bm.find_cached_prefix(make_seq(tokens + [8])) == first.block_ids


def test_stored_event_describes_the_stored_blocks_when_a_later_one_is_cached_elsewhere():
    # Block 1 of the prompt stays cached (held by `second`) after block 0's only keyed copy
    # was evicted; a third sequence stores block 0 again and finds block 1 already there.
    bm = BlockManager(num_blocks=4, block_size=2, model_id="m")
    prompt = [1, 2, 3, 4]
    k0, k1 = keys_of(prompt, 2)
    first, second = make_seq(prompt), make_seq(prompt)
    compute(bm, first, 2)  # stores k0
    compute(bm, second, 4)  # its block 0 duplicates k0 (no key); its block 1 stores k1
    assert bm.take_events() == [BlockStored((k0,), ROOT_KEY, (1, 2), 2),
                                BlockStored((k1,), k0, (3, 4), 2)]
    bm.free(first)
    filler = make_seq([9, 9, 9, 9])
    assert bm.allocate(filler, 4)  # the last free page, then first's page: k0 evicted
    assert bm.take_events() == [BlockRemoved((k0,))]
    bm.free(filler)

    third = make_seq(prompt + [5])
    assert bm.find_cached_prefix(third) == []
    compute(bm, third, 4)
    assert bm.take_events() == [BlockStored((k0,), ROOT_KEY, (1, 2), 2)]


def test_reset_prefix_cache_is_refused_while_blocks_are_in_use():
    bm = BlockManager(num_blocks=4, block_size=2)
    seq = make_seq([1, 2, 3])
    compute(bm, seq, 3)
    bm.take_events()
    assert bm.reset_prefix_cache() is False
    assert bm.take_events() == []
    assert bm.num_cached_blocks == 1
    bm.free(seq)
    assert bm.reset_prefix_cache() is True
    assert bm.take_events() == [AllBlocksCleared()]
    assert bm.num_cached_blocks == 0
    assert bm.find_cached_prefix(make_seq([1, 2, 3])) == []
    filler = make_seq(range(8))
    assert bm.allocate(filler, 8)
    assert bm.take_events() == []  # nothing left to evict


def test_take_events_drains():
    bm = BlockManager(num_blocks=2, block_size=2)
    compute(bm, make_seq([1, 2]), 2)
    assert len(bm.take_events()) == 1
    assert bm.take_events() == []


# -- figures ---------------------------------------------------------------------------------


def test_record_lookup_accumulates_hit_rate():
    bm = BlockManager(num_blocks=2, block_size=2)
    assert (bm.stats.queries, bm.stats.hits, bm.stats.hit_rate) == (0, 0, 0.0)
    bm.record_lookup(16, 8)
    assert (bm.stats.queries, bm.stats.hits, bm.stats.hit_rate) == (16, 8, 0.5)
    bm.record_lookup(16, 0)
    assert (bm.stats.queries, bm.stats.hits, bm.stats.hit_rate) == (32, 8, 0.25)


def test_usage_and_fragmentation():
    bm = BlockManager(num_blocks=8, block_size=4)
    five = make_seq(range(7))
    assert bm.allocate(five, 5)
    five.num_computed_tokens = 5  # 5 of 8 slots in 2 pages
    assert bm.usage == 2 / 8
    assert bm.fragmentation([five]) == 3 / 8
    four = make_seq(range(4))
    compute(bm, four, 4)
    assert bm.usage == 3 / 8
    assert bm.fragmentation([five, four]) == 3 / 12
    assert bm.fragmentation([]) == 0.0
    bm.free(five)
    bm.free(four)
    assert bm.usage == 0.0  # cached pages in the pool count as free


def test_invalid_sizes_are_refused():
    with pytest.raises(ValueError, match="num_blocks=0"):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError, match="block_size=0"):
        BlockManager(num_blocks=4, block_size=0)


def test_disabled_prefix_caching_gives_no_hits_and_no_events():
    bm = BlockManager(num_blocks=3, block_size=2, enable_prefix_caching=False)
    first = make_seq([1, 2, 3, 4, 5])
    compute(bm, first, 5)
    assert bm.num_cached_blocks == 0
    assert bm.find_cached_prefix(make_seq([1, 2, 3, 4, 5])) == []
    bm.free(first)
    filler = make_seq(range(6))
    assert bm.allocate(filler, 6)
    assert bm.take_events() == []


def test_events_nobody_takes_are_a_ring_of_the_newest():
    """With prefix caching on and no consumer, events were appended forever (the issue's leak:
    33,132 after ~3,000 requests). Now the newest `max_events` stay and the rest are counted."""
    bm = BlockManager(num_blocks=4, block_size=4, max_events=5)
    for i in range(10):  # each prompt stores one block and, once the pool is full, evicts one
        seq = make_seq(range(100 * i, 100 * i + 4))
        compute(bm, seq, 4)
        bm.free(seq)
    events = bm.take_events()
    assert len(events) == 5 and bm.num_events_dropped == 10 + 6 - 5  # 10 stored, 6 evicted
    assert [type(e).__name__ for e in events] == ["BlockStored"] + ["BlockRemoved", "BlockStored"] * 2
    assert events[-1] == BlockStored((block_key(ROOT_KEY, list(range(900, 904)), "", "", ""),), ROOT_KEY,
                                     tuple(range(900, 904)), 4)
    assert bm.take_events() == []
    silent = BlockManager(num_blocks=4, block_size=4, max_events=0)
    compute(silent, make_seq(range(4)), 4)
    assert silent.take_events() == [] and silent.num_events_dropped == 1
