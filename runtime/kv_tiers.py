"""KV cache tiers below the device: host memory, then block files on a local disk.

Every page that enters the prefix cache (the scheduler's `complete`, so its K/V is written)
is copied to the host tier and queued for the disk tier: write-through, not spill-on-evict.
A `kill -9` gives no chance to spill, and a page evicted from the device is then already
below it. On a prefix miss on the device, the block manager asks the tiers for the next
keys of the chain; a block found there is loaded into a free page before the step that
reads it (runtime/engine.py), and counts as a cached token like any device hit.

Disk layout, under `disk_dir/<model digest[:16]>/`:

    blocks/<key hex[:2]>/<key hex>.kvb   header (JSON, length-prefixed) + K/V bytes
    index.sqlite                         WAL: key, parent, tokens, size, checksum, last use

A block file is written to a temporary name, fsynced and renamed before its row is
committed, so a row always names a whole file; the file's header repeats the key, the
model digest and the SHA-256 of its bytes. On start every row is checked against its file
(size, header, checksum): a torn, corrupted or foreign block is deleted, as are files
without a row. Rows of another model digest are dropped with their files.

Sizes are bounded per tier (bytes); each tier evicts its least recently used block. The
keys are the block manager's chained SHA-256 keys, equal across processes and restarts.
Plain Python and numpy: no jax here (the runner moves pages to and from the device).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import sqlite3
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, for blocks of a bfloat16 cache
import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"TKVB1\n"
SUFFIX = ".kvb"


@dataclass(slots=True)
class KvTierConfig:
    disk_dir: str
    """Folder of the disk tier (created if missing)."""
    model_digest: str
    """The served model's digest: blocks of any other digest are dropped on start."""
    host_bytes: int = 256 * 2**20
    """Host memory tier, bytes."""
    disk_bytes: int = 4 * 2**30
    """Disk tier, bytes of block files."""

    def __post_init__(self):
        if not self.model_digest:
            raise ValueError("the KV disk tier needs the model's digest")
        if self.host_bytes < 0 or self.disk_bytes < 1:
            raise ValueError(f"host_bytes={self.host_bytes} must be >= 0 and disk_bytes={self.disk_bytes} >= 1")


@dataclass(slots=True)
class TierStats:
    blocks: int = 0
    bytes: int = 0
    capacity_bytes: int = 0
    hits: int = 0  # lookups answered by this tier
    loads: int = 0  # blocks read from this tier towards the device
    load_seconds: float = 0.0
    evictions: int = 0
    dropped: int = 0  # blocks found torn, corrupted or foreign (disk: on start or on load)


@dataclass(frozen=True, slots=True)
class StoredBlock:
    """What the tiers know of a block besides its bytes: enough to advertise it again."""

    key: bytes
    parent: bytes
    token_ids: tuple[int, ...]


@dataclass(slots=True)
class _DiskEntry:
    block: StoredBlock
    path: Path
    size: int
    checksum: str
    last_use: float


class HostTier:
    """Blocks as numpy arrays in an LRU of bounded bytes."""

    def __init__(self, capacity_bytes: int):
        self.stats = TierStats(capacity_bytes=capacity_bytes)
        self._blocks: OrderedDict[bytes, np.ndarray] = OrderedDict()

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def get(self, key: bytes) -> np.ndarray | None:
        data = self._blocks.get(key)
        if data is not None:
            self._blocks.move_to_end(key)
        return data

    def put(self, key: bytes, data: np.ndarray) -> None:
        if data.nbytes > self.stats.capacity_bytes or key in self._blocks:
            return
        while self.stats.bytes + data.nbytes > self.stats.capacity_bytes:
            _, old = self._blocks.popitem(last=False)
            self.stats.bytes -= old.nbytes
            self.stats.evictions += 1
        self._blocks[key] = data
        self.stats.bytes += data.nbytes
        self.stats.blocks = len(self._blocks)

    def clear(self) -> None:
        self._blocks.clear()
        self.stats.blocks = self.stats.bytes = 0


def encode_block(block: StoredBlock, model_digest: str, data: np.ndarray) -> tuple[bytes, str]:
    """The file's bytes and the payload's SHA-256."""
    payload = np.ascontiguousarray(data).tobytes()
    checksum = hashlib.sha256(payload).hexdigest()
    header = json.dumps({
        "key": block.key.hex(), "parent": block.parent.hex(), "model_digest": model_digest,
        "dtype": data.dtype.name, "shape": list(data.shape), "sha256": checksum, "bytes": len(payload),
    }).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + payload, checksum


def decode_block(raw: bytes, key: bytes, model_digest: str) -> np.ndarray:
    """The block's array; ValueError saying what is wrong with a torn or foreign file."""
    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 4:
        raise ValueError("bad magic")
    (n,) = struct.unpack_from("<I", raw, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(raw[start : start + n])
    except ValueError:
        raise ValueError("unreadable header") from None
    payload = raw[start + n :]
    if header.get("key") != key.hex() or header.get("model_digest") != model_digest:
        raise ValueError("key or model digest differs")
    if len(payload) != header.get("bytes") or hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise ValueError("checksum mismatch (torn or corrupted)")
    return np.frombuffer(payload, dtype=np.dtype(header["dtype"])).reshape(header["shape"])


class DiskTier:
    """Block files plus a SQLite (WAL) index; files are written by one background thread."""

    def __init__(self, folder: Path, model_digest: str, capacity_bytes: int):
        self.folder, self.model_digest = folder, model_digest
        self.stats = TierStats(capacity_bytes=capacity_bytes)
        self._entries: OrderedDict[bytes, _DiskEntry] = OrderedDict()  # LRU first
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0  # puts queued, not yet committed
        (folder / "blocks").mkdir(parents=True, exist_ok=True)
        self._db = self._open_db(folder / "index.sqlite")
        self.restored = self._recover()
        self._writer = threading.Thread(target=self._write_loop, name="kv-disk-writer", daemon=True)
        self._writer.start()

    @property
    def num_pending_writes(self) -> int:
        return self._pending

    def _open_db(self, path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE IF NOT EXISTS blocks (key BLOB PRIMARY KEY, parent BLOB NOT NULL, "
                   "tokens TEXT NOT NULL, model_digest TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL, "
                   "checksum TEXT NOT NULL, last_use REAL NOT NULL)")
        return db

    def _path(self, key: bytes) -> Path:
        h = key.hex()
        return self.folder / "blocks" / h[:2] / (h + SUFFIX)

    # -- start-up --------------------------------------------------------------------------

    def _recover(self) -> list[StoredBlock]:
        """Check every row against its file; drop what does not verify, and files without a row."""
        rows = self._db.execute("SELECT key, parent, tokens, model_digest, path, size, checksum, last_use "
                                "FROM blocks ORDER BY last_use").fetchall()
        bad, kept = [], []
        for key, parent, tokens, digest, rel, size, checksum, last_use in rows:
            path = self.folder / rel
            try:
                if digest != self.model_digest:
                    raise ValueError("another model's block")
                raw = path.read_bytes()
                if len(raw) != size:
                    raise ValueError(f"size {len(raw)} != {size} (torn)")
                decode_block(raw, key, self.model_digest)
            except (OSError, ValueError) as e:
                log.warning("dropping KV block %s from the disk tier: %s", key.hex()[:16], e)
                bad.append(key)
                path.unlink(missing_ok=True)
                continue
            block = StoredBlock(key, parent, tuple(json.loads(tokens)))
            self._entries[key] = _DiskEntry(block, path, size, checksum, last_use)
            self.stats.bytes += size
            kept.append(block)
        self.stats.dropped += len(bad)
        if bad:
            self._db.executemany("DELETE FROM blocks WHERE key = ?", [(k,) for k in bad])
        for path in (self.folder / "blocks").rglob("*"):  # orphans: half-written temps, rows never committed
            if path.is_file() and (path.suffix != SUFFIX or bytes.fromhex(path.stem) not in self._entries):
                path.unlink(missing_ok=True)
        self.stats.blocks = len(self._entries)
        while self.stats.bytes > self.stats.capacity_bytes and self._entries:  # the bound may have shrunk
            self._evict_lru()
        return kept

    # -- the loop thread's side ------------------------------------------------------------

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def put(self, block: StoredBlock, data: np.ndarray) -> list[bytes]:
        """Queue the block for writing; the keys evicted to make room."""
        if block.key in self._entries:
            return []
        raw, checksum = encode_block(block, self.model_digest, data)
        evicted = []
        while self._entries and self.stats.bytes + len(raw) > self.stats.capacity_bytes:
            evicted.append(self._evict_lru())
        if len(raw) > self.stats.capacity_bytes:
            return evicted
        entry = _DiskEntry(block, self._path(block.key), len(raw), checksum, time.time())
        with self._lock:
            self._entries[block.key] = entry
            self._pending += 1
        self.stats.bytes += len(raw)
        self.stats.blocks = len(self._entries)
        self._queue.put(("put", entry, raw))
        return evicted

    def get(self, key: bytes) -> np.ndarray | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        try:
            data = decode_block(entry.path.read_bytes(), key, self.model_digest)
        except FileNotFoundError:
            return None  # still queued for writing: the host tier had dropped it already
        except (OSError, ValueError) as e:
            log.warning("dropping KV block %s from the disk tier on load: %s", key.hex()[:16], e)
            self.stats.dropped += 1
            self._forget(key)
            return None
        entry.last_use = time.time()
        with self._lock:
            self._entries.move_to_end(key)
        self._queue.put(("touch", key, entry.last_use))
        return data

    def _evict_lru(self) -> bytes:
        key = next(iter(self._entries))
        self._forget(key)
        self.stats.evictions += 1
        return key

    def _forget(self, key: bytes) -> None:
        with self._lock:
            entry = self._entries.pop(key)
        self.stats.bytes -= entry.size
        self.stats.blocks = len(self._entries)
        self._queue.put(("delete", entry, None))

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued write is on disk and committed."""
        done = threading.Event()
        self._queue.put(("flush", done, None))
        return done.wait(timeout)

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._writer.join(10)
        self._db.close()

    # -- the writer thread -----------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < 256:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            try:
                self._write_batch([op for op in batch if op is not None])
            except Exception:  # noqa: BLE001 - a failed write loses cache, never correctness
                log.exception("KV disk tier: a write batch failed")
            if stop:
                return

    def _write_batch(self, batch: list) -> None:
        sql, deletes, flushed, written = [], [], [], 0
        for op, a, b in batch:  # SQL in queue order: a block evicted then stored again stays stored
            if op == "put":
                written += 1
                try:
                    _write_file(a.path, b)
                except OSError as e:
                    log.warning("KV disk tier: cannot write %s: %s", a.path, e)
                    with self._lock:
                        if self._entries.get(a.block.key) is a:
                            del self._entries[a.block.key]
                    continue
                block = a.block
                sql.append(("INSERT OR REPLACE INTO blocks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (block.key, block.parent, json.dumps(block.token_ids), self.model_digest,
                             a.path.relative_to(self.folder).as_posix(), a.size, a.checksum, a.last_use)))
            elif op == "delete":
                deletes.append(a)
                sql.append(("DELETE FROM blocks WHERE key = ?", (a.block.key,)))
            elif op == "touch":
                sql.append(("UPDATE blocks SET last_use = ? WHERE key = ?", (b, a)))
            elif op == "flush":
                flushed.append(a)
        if sql:  # one transaction, committed only after its files were synced
            self._db.execute("BEGIN")
            for statement, args in sql:
                self._db.execute(statement, args)
            self._db.execute("COMMIT")
        for entry in deletes:
            with self._lock:
                still_held = entry.block.key in self._entries
            if not still_held:
                entry.path.unlink(missing_ok=True)
        with self._lock:
            self._pending -= written
        for event in flushed:
            event.set()


def _write_file(path: Path, raw: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


@dataclass
class KvTiers:
    """Host then disk, below the device; the block manager's `tier`."""

    config: KvTierConfig
    on_removed: list = field(default_factory=list)  # callbacks(key) for keys that left every tier

    def __post_init__(self):
        self.host = HostTier(self.config.host_bytes)
        folder = Path(self.config.disk_dir) / self.config.model_digest[:16]
        self.disk = DiskTier(folder, self.config.model_digest, self.config.disk_bytes)
        self._stored: set[bytes] = set()

    @property
    def restored(self) -> list[StoredBlock]:
        """Blocks found on disk at start, least recently used first."""
        return self.disk.restored

    def __contains__(self, key: bytes) -> bool:
        return key in self.host or key in self.disk

    def save(self, block: StoredBlock, data: np.ndarray) -> None:
        self.host.put(block.key, data)
        for key in self.disk.put(block, data):
            if key not in self.host:
                for callback in self.on_removed:
                    callback(key)

    def load(self, key: bytes) -> np.ndarray | None:
        """The block's K/V from the highest tier holding it (a disk hit is kept on the host too)."""
        started = time.perf_counter()
        data = self.host.get(key)
        tier = self.host
        if data is None:
            data, tier = self.disk.get(key), self.disk
            if data is not None:
                self.host.put(key, data)
        if data is None:
            return None
        tier.stats.hits += 1
        tier.stats.loads += 1
        tier.stats.load_seconds += time.perf_counter() - started
        return data

    def stats(self) -> dict[str, TierStats]:
        return {"host": self.host.stats, "disk": self.disk.stats}

    def flush(self, timeout: float = 30.0) -> bool:
        return self.disk.flush(timeout)

    def close(self) -> None:
        self.disk.close()
