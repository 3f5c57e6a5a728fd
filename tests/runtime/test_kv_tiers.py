"""The KV tiers below the device: host LRU, disk block files with a SQLite index, recovery.

Plain numpy and files; the engine-level tests (pages really moved to and from the device,
identical tokens after a restart) are in test_kv_tiers_engine.py and tests/integration.
"""

from __future__ import annotations

import hashlib
import sqlite3

import numpy as np
import pytest

from runtime.block_manager import ROOT_KEY, BlockManager, BlockRemoved, BlockStored, block_key
from runtime.kv_tiers import KvTierConfig, KvTiers, StoredBlock, encode_block
from runtime.request import Request, SamplingParams

DIGEST = "d" * 64
SHAPE = (2, 2, 4, 1, 8)  # layers, k/v, page_size, kv_heads, head_dim


def _block(i: int) -> tuple[StoredBlock, np.ndarray]:
    key = hashlib.sha256(f"block {i}".encode()).digest()
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + i
    return StoredBlock(key, ROOT_KEY, (i, i + 1, i + 2, i + 3)), data


def _tiers(tmp_path, **kw) -> KvTiers:
    return KvTiers(KvTierConfig(str(tmp_path), DIGEST, **kw))


def _files(tmp_path):
    return sorted(tmp_path.rglob("*.kvb"))


def test_blocks_survive_a_restart_with_their_bytes_and_chain(tmp_path):
    tiers = _tiers(tmp_path)
    blocks = [_block(i) for i in range(5)]
    for block, data in blocks:
        tiers.save(block, data)
    tiers.close()
    assert len(_files(tmp_path)) == 5

    again = _tiers(tmp_path)
    assert [b.key for b in again.restored] == [b.key for b, _ in blocks]  # oldest use first
    assert again.restored[3].token_ids == (3, 4, 5, 6)
    np.testing.assert_array_equal(again.load(blocks[2][0].key), blocks[2][1])
    stats = again.stats()
    assert (stats["disk"].hits, stats["disk"].loads, stats["host"].loads) == (1, 1, 0)
    np.testing.assert_array_equal(again.load(blocks[2][0].key), blocks[2][1])  # now from the host copy
    assert (stats["disk"].loads, stats["host"].loads) == (1, 1)
    assert again.load(b"\0" * 32) is None
    again.close()


def test_a_corrupted_or_torn_block_is_dropped_on_start(tmp_path):
    tiers = _tiers(tmp_path)
    blocks = [_block(i) for i in range(4)]
    for block, data in blocks:
        tiers.save(block, data)
    tiers.close()
    path = lambda b: next(p for p in _files(tmp_path) if p.stem == b.key.hex())  # noqa: E731
    flipped = bytearray(path(blocks[1][0]).read_bytes())
    flipped[-5] ^= 0x40  # one bit of the K/V payload
    path(blocks[1][0]).write_bytes(bytes(flipped))
    torn = path(blocks[2][0]).read_bytes()
    path(blocks[2][0]).write_bytes(torn[: len(torn) // 2])  # a kill -9 mid-write (had the row been committed)
    (path(blocks[3][0]).parent / "ff00.tmp").write_bytes(b"half")  # a temp file never renamed

    again = _tiers(tmp_path)
    assert {b.key for b in again.restored} == {blocks[0][0].key, blocks[3][0].key}
    assert again.stats()["disk"].dropped == 2
    assert blocks[1][0].key not in again and blocks[2][0].key not in again
    assert {p.stem for p in _files(tmp_path)} == {blocks[0][0].key.hex(), blocks[3][0].key.hex()}
    assert not list(tmp_path.rglob("*.tmp"))
    rows = sqlite3.connect(next(tmp_path.rglob("index.sqlite"))).execute("SELECT count(*) FROM blocks").fetchone()
    assert rows == (2,)
    again.close()


def test_another_model_digest_never_sees_the_blocks(tmp_path):
    tiers = _tiers(tmp_path)
    tiers.save(*_block(0))
    tiers.close()
    other = KvTiers(KvTierConfig(str(tmp_path), "e" * 64))
    assert other.restored == [] and _block(0)[0].key not in other
    other.close()


def test_each_tier_is_bounded_and_evicts_its_least_recently_used(tmp_path):
    nbytes = _block(0)[1].nbytes
    file_size = len(encode_block(_block(0)[0], DIGEST, _block(0)[1])[0])
    tiers = _tiers(tmp_path, host_bytes=2 * nbytes, disk_bytes=3 * file_size)
    removed = []
    tiers.on_removed.append(removed.append)
    blocks = [_block(i) for i in range(3)]
    for block, data in blocks:
        tiers.save(block, data)
    assert tiers.stats()["host"].blocks == 2 and blocks[0][0].key not in tiers.host
    tiers.flush()
    assert tiers.load(blocks[0][0].key) is not None  # disk hit: block 0 is now the newest on disk
    tiers.save(*_block(3))  # the disk is full: its least recently used (block 1) goes
    assert removed == [blocks[1][0].key]  # gone from the host too (the load of block 0 pushed it out)
    assert blocks[1][0].key not in tiers.disk and blocks[0][0].key in tiers.disk
    assert tiers.stats()["disk"].evictions == 1 and tiers.stats()["disk"].blocks == 3
    tiers.close()
    assert len(_files(tmp_path)) == 3


# -- the block manager's side -------------------------------------------------------------------


def _seq(tokens):
    request = Request("r", list(tokens), SamplingParams(max_tokens=1))
    return request.sequences[0]


def test_a_device_miss_is_served_from_the_tier_and_loaded_before_the_step(tmp_path):
    tiers = _tiers(tmp_path)
    first = BlockManager(num_blocks=8, block_size=4, model_id="m")
    first.tier = tiers
    seq = _seq(range(13))
    first.allocate(seq, 13)
    seq.num_computed_tokens = 13
    first.cache_full_blocks(seq)
    saved = first.take_blocks_to_save()
    assert [s.token_ids for s, _ in saved] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11)]
    assert saved[1][0].parent_key == saved[0][0].keys[0] and saved[0][0].parent_key == ROOT_KEY
    for stored, page in saved:
        tiers.save(StoredBlock(stored.keys[0], stored.parent_key, stored.token_ids), np.full(SHAPE, page, np.float32))

    # A new process: an empty device, the same tier.
    second = BlockManager(num_blocks=8, block_size=4, model_id="m")
    second.tier = tiers
    again = _seq(range(14))
    hits = second.find_cached_prefix(again)
    assert len(hits) == 3
    loads = second.take_pending_loads()
    assert sorted(loads) == sorted(hits)
    assert [int(loads[b].flat[0]) for b in hits] == [page for _, page in saved]  # each page's own bytes
    assert second.allocate(again, 14, hits)
    assert second.num_free_blocks == 8 - 4
    assert second.take_blocks_to_save() == []  # already below: not saved twice
    tiers.close()


def test_evicting_a_page_the_tier_holds_is_not_a_removal(tmp_path):
    tiers = _tiers(tmp_path)
    blocks = BlockManager(num_blocks=2, block_size=4, model_id="m")
    blocks.tier = tiers
    seq = _seq(range(4))
    blocks.allocate(seq, 4)
    seq.num_computed_tokens = 4
    blocks.cache_full_blocks(seq)
    (stored, page), = blocks.take_blocks_to_save()
    tiers.save(StoredBlock(stored.keys[0], stored.parent_key, stored.token_ids), np.zeros(SHAPE, np.float32))
    blocks.free(seq)
    other = _seq(range(100, 108))
    blocks.allocate(other, 8)  # takes both pages, evicting the cached one
    events = blocks.take_events()
    assert [type(e) for e in events] == [BlockStored]
    blocks.note_tier_removed(stored.keys[0])
    assert blocks.take_events() == [BlockRemoved(stored.keys)]
    tiers.close()


def test_a_load_never_takes_the_pages_the_sequence_still_needs(tmp_path):
    tiers = _tiers(tmp_path)
    keys = []
    parent = ROOT_KEY
    for b in range(3):
        key = block_key(parent, list(range(b * 4, b * 4 + 4)), "m", "", "")
        tiers.save(StoredBlock(key, parent, tuple(range(b * 4, b * 4 + 4))), np.zeros(SHAPE, np.float32))
        keys.append(key)
        parent = key
    small = BlockManager(num_blocks=4, block_size=4, model_id="m")
    small.tier = tiers
    seq = _seq(range(20))  # 5 pages: more than the pool, so no page can be spared for a load
    assert small.find_cached_prefix(seq) == []
    roomy = BlockManager(num_blocks=5, block_size=4, model_id="m")
    roomy.tier = tiers
    assert len(roomy.find_cached_prefix(_seq(range(20)))) == 3
    tiers.close()


def test_the_config_refuses_bad_values(tmp_path):
    with pytest.raises(ValueError, match="digest"):
        KvTierConfig(str(tmp_path), "")
    with pytest.raises(ValueError, match="disk_bytes"):
        KvTierConfig(str(tmp_path), DIGEST, disk_bytes=0)
