"""Host-side bookkeeping of KV cache pages: reference counts, prefix caching, LRU reuse.

A block holds `block_size` tokens of one or more sequences' KV. Once a block is full its
content is fixed, and it gets a key: SHA-256 over (parent block's key, its token ids, model
id, adapter id, cache salt). Equal keys mean equal KV, in any process, after any restart.
A freed block keeps its key and sits in an LRU pool; a later sequence with the same prefix
takes it back instead of recomputing it, until the pool needs the page for something else.

Every key stored or evicted is also an event for consumers (a router, a metadata store) that
`take_events()` drains. Until one is wired up nothing drains them, so they are a ring of the
newest `max_events`: older ones are dropped and counted, and memory stays flat however long
the server runs.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from runtime.request import Sequence

if TYPE_CHECKING:
    import numpy as np

# The root every chain starts from: a constant, never random, so keys agree across processes.
ROOT_KEY = hashlib.sha256(b"tessera/prefix-cache/v1").digest()


def block_key(parent: bytes, token_ids: list[int] | tuple[int, ...], model_id: str, adapter_id: str, salt: str) -> bytes:
    h = hashlib.sha256(parent)
    h.update(struct.pack(f"<I{len(token_ids)}I", len(token_ids), *token_ids))
    for part in (model_id, adapter_id, salt):
        raw = part.encode()
        h.update(struct.pack("<I", len(raw)) + raw)  # length-prefixed: no ambiguity between fields
    return h.digest()


@dataclass(frozen=True)
class BlockStored:
    keys: tuple[bytes, ...]
    parent_key: bytes
    token_ids: tuple[int, ...]
    block_size: int


@dataclass(frozen=True)
class BlockRemoved:
    keys: tuple[bytes, ...]


@dataclass(frozen=True)
class AllBlocksCleared:
    pass


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    key: bytes | None = None


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass
class BlockManager:
    num_blocks: int
    block_size: int
    model_id: str = ""
    enable_prefix_caching: bool = True
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    max_events: int = 10_000  # KV events kept until taken; beyond it the oldest are dropped
    tier: object | None = None  # runtime/kv_tiers.py KvTiers: blocks below the device, or None

    def __post_init__(self):
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError(f"num_blocks={self.num_blocks} and block_size={self.block_size} must be >= 1")
        self._blocks = [_Block(i) for i in range(self.num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(self.num_blocks))  # LRU first
        self._cached: dict[bytes, int] = {}  # key -> block id
        self._seq_keys: dict[int, list[bytes]] = {}  # seq id -> keys of its full blocks, in order
        self._events: deque = deque(maxlen=max(self.max_events, 0))
        self.num_events_dropped = 0
        self._to_save: list[tuple[BlockStored, int]] = []  # newly cached (one key each, block id): for the tier
        self._pending_loads: dict[int, np.ndarray] = {}  # block id -> K/V from the tier, not yet on the device

    # -- figures -----------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, including cached ones not in use)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def fragmentation(self, sequences: list[Sequence]) -> float:
        """Allocated but unused slots / allocated slots, over the given (running) sequences."""
        allocated = sum(len(s.block_ids) for s in sequences) * self.block_size
        used = sum(min(s.num_computed_tokens, len(s.block_ids) * self.block_size) for s in sequences)
        return (allocated - used) / allocated if allocated else 0.0

    def take_events(self) -> list:
        # popleft, not list() then clear(): the engine's loop thread may append while the
        # consumer (EngineClient.kv_events) drains from another thread; deque ops are atomic.
        events = []
        while True:
            try:
                events.append(self._events.popleft())
            except IndexError:
                return events

    def _emit(self, event) -> None:
        if len(self._events) == self._events.maxlen:
            self.num_events_dropped += 1  # the deque drops the oldest (or, with no room at all, this one)
        self._events.append(event)

    # -- prefix cache --------------------------------------------------------------------

    def _context(self, seq: Sequence) -> tuple[str, str, str]:
        return self.model_id, seq.request.adapter_id, seq.request.cache_salt

    def _full_block_keys(self, seq: Sequence, num_tokens: int) -> list[bytes]:
        """Keys of the first num_tokens // block_size blocks, extending the memo of `seq`."""
        keys = self._seq_keys.setdefault(seq.seq_id, [])
        for b in range(len(keys), num_tokens // self.block_size):
            parent = keys[-1] if keys else ROOT_KEY
            chunk = seq.token_ids[b * self.block_size : (b + 1) * self.block_size]
            keys.append(block_key(parent, chunk, *self._context(seq)))
        return keys[: num_tokens // self.block_size]

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of `seq`'s tokens.

        At least one token is always left to compute, because its logits are needed.
        """
        if not self.enable_prefix_caching:
            return []
        hits = []
        for key in self._full_block_keys(seq, seq.num_tokens - 1):
            block_id = self._cached.get(key)
            if block_id is None:
                block_id = self._load_from_tier(key, seq, hits)
                if block_id is None:
                    break
            elif self.tier is not None and block_id in self._free:
                self._free.move_to_end(block_id)  # loads from the tier below must not evict it
            hits.append(block_id)
        return hits

    def _load_from_tier(self, key: bytes, seq: Sequence, hits: list[int]) -> int | None:
        """A free page given `key` and the tier's K/V for it (written to the device before the next
        step: `take_pending_loads`), if the tier has it and the pool can spare the page: the
        sequence's remaining blocks must still fit beside the hits it would hold."""
        if self.tier is None or key not in self.tier:
            return None
        free_hits = sum(1 for b in hits if self._blocks[b].ref_count == 0)
        still_needed = -(-seq.num_tokens // self.block_size) - len(hits)
        if len(self._free) - free_hits < still_needed:
            return None
        data = self.tier.load(key)
        if data is None:
            return None
        block_id = self._take_free_block()
        block = self._blocks[block_id]
        block.ref_count, block.key = 0, key
        self._free[block_id] = None  # back in the pool as a cached block, most recently used
        self._cached[key] = block_id
        self._pending_loads[block_id] = data
        return block_id

    def take_pending_loads(self) -> dict[int, np.ndarray]:
        """Pages whose K/V must be written to the device before the next step runs."""
        loads, self._pending_loads = self._pending_loads, {}
        return loads

    def take_blocks_to_save(self) -> list[tuple[BlockStored, int]]:
        """Blocks cached since the last call, for the tier to copy (one key each, with its page)."""
        blocks, self._to_save = self._to_save, []
        return blocks

    def record_lookup(self, num_queried: int, num_hit: int) -> None:
        self.stats.queries += num_queried
        self.stats.hits += num_hit

    def cache_full_blocks(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Give keys to `seq`'s blocks that are full of its first `num_tokens` tokens (default: the
        computed ones), whose K/V a step has written."""
        if not self.enable_prefix_caching:
            return
        keys = self._full_block_keys(seq, seq.num_computed_tokens if num_tokens is None else num_tokens)
        runs: list[list[int]] = []  # indices of newly stored blocks, in contiguous runs
        for b, key in enumerate(keys):
            block = self._blocks[seq.block_ids[b]]
            if block.key is not None:
                continue
            if key in self._cached:
                continue  # another sequence computed the same block first; keep the first copy
            block.key = key
            self._cached[key] = block.block_id
            if self.tier is not None and key not in self.tier:
                tokens = tuple(seq.token_ids[b * self.block_size : (b + 1) * self.block_size])
                self._to_save.append((BlockStored((key,), keys[b - 1] if b else ROOT_KEY, tokens, self.block_size),
                                      block.block_id))
            if runs and runs[-1][-1] == b - 1:
                runs[-1].append(b)
            else:
                runs.append([b])
        # One event per run, so that each event's parent and tokens belong to its keys.
        for run in runs:
            first, end = run[0], run[-1] + 1
            parent = keys[first - 1] if first else ROOT_KEY
            tokens = tuple(seq.token_ids[first * self.block_size : end * self.block_size])
            self._emit(BlockStored(tuple(keys[first:end]), parent, tokens, self.block_size))

    def reset_prefix_cache(self) -> bool:
        """Forget every key; refused (False) while a block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self._blocks:
            block.key = None
        self._cached.clear()
        self._seq_keys.clear()
        self._pending_loads.clear()
        self._to_save.clear()
        self._emit(AllBlocksCleared())
        return True

    def note_tier_stored(self, key: bytes, parent: bytes, token_ids: tuple[int, ...]) -> None:
        """A block a tier below holds (found there at start): advertised like a cached one."""
        self._emit(BlockStored((key,), parent, tuple(token_ids), self.block_size))

    def note_tier_removed(self, key: bytes) -> None:
        """A tier below dropped `key`; gone from this worker unless the device still holds it."""
        if key not in self._cached:
            self._emit(BlockRemoved((key,)))

    # -- allocation ----------------------------------------------------------------------

    def blocks_needed(self, seq: Sequence, num_tokens: int, cached: list[int] | tuple[int, ...] = ()) -> int:
        """New blocks `seq` must take to hold `num_tokens` tokens, after reusing `cached`.

        Cached blocks that sit unused in the free pool also leave it, so they count too.
        """
        have = max(len(seq.block_ids), len(cached))
        want = -(-num_tokens // self.block_size)
        revived = sum(1 for b in cached if self._blocks[b].ref_count == 0)
        return max(0, want - have) + revived

    def can_allocate(self, seq: Sequence, num_tokens: int, cached: list[int] | tuple[int, ...] = ()) -> bool:
        return self.blocks_needed(seq, num_tokens, cached) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int, cached: list[int] | tuple[int, ...] = ()) -> bool:
        """Make `seq` own enough blocks for `num_tokens` tokens; False (and no change) if the
        pool is short. `cached` is a prefix from `find_cached_prefix`, for a sequence that
        owns no blocks yet."""
        if not cached and len(seq.block_ids) * self.block_size >= num_tokens:
            return True  # a decode inside its last page: the common case, nothing to take
        if not self.can_allocate(seq, num_tokens, cached):
            return False
        if cached:
            assert not seq.block_ids, "a cached prefix is taken only at admission"
            for block_id in cached:
                self._acquire(block_id)
            seq.block_ids = list(cached)
        while len(seq.block_ids) * self.block_size < num_tokens:
            seq.block_ids.append(self._take_free_block())
        return True

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks. Tail blocks go to the front of the LRU pool, so a shared
        prefix outlives the tails that hang off it."""
        for block_id in reversed(seq.block_ids):
            block = self._blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.key is None:
                    self._free.move_to_end(block_id, last=False)  # keyless: reuse first
        seq.block_ids = []
        self._seq_keys.pop(seq.seq_id, None)

    def _acquire(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.key is not None:  # evict the least recently used cached block
            del self._cached[block.key]
            self._pending_loads.pop(block_id, None)
            if self.tier is None or block.key not in self.tier:  # else still served, from below
                self._emit(BlockRemoved((block.key,)))
            block.key = None
        block.ref_count = 1
        return block_id
