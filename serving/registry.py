"""The cluster's shared state in etcd: worker records, KV summaries, routing configuration.

Keys (all under one versioned prefix, so a later layout can live beside this one):

    /tessera/v1/workers/<worker_id>  JSON WorkerRecord            under the worker's lease
    /tessera/v1/kv/<worker_id>       JSON KV summary              under the worker's lease
    /tessera/v1/pools/<pool>         JSON {"weight": 3, "drain": false}   operator's, no lease
    /tessera/v1/drain/<worker_id>    any value: take no new requests      operator's, no lease

A worker holds one lease (TTL `lease_ttl_s`, refreshed every third of it) and writes its
record and its KV summary under it: when the process dies both vanish with the lease. The KV
summary is bounded (the newest `KV_SUMMARY_KEYS` block keys, hex) and written at most once a
second, and only when it changed; per-block events go to gateways over gRPC (KvEvents), never
through etcd. A pool without a key has weight 1 and is not drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aetcd

from runtime.block_manager import AllBlocksCleared, BlockRemoved, BlockStored

log = logging.getLogger(__name__)

PREFIX = "/tessera/v1/"
WORKERS = PREFIX + "workers/"
KV = PREFIX + "kv/"
POOLS = PREFIX + "pools/"
DRAIN = PREFIX + "drain/"
KV_SUMMARY_KEYS = 512
KV_SUMMARY_PERIOD_S = 1.0


@dataclass
class WorkerRecord:
    worker_id: str
    address: str  # host:port of its gRPC server
    pool: str = "default"
    region: str = "local"
    model: str = ""  # the engine's model id (part of every prefix-cache key)
    model_digest: str = ""
    adapters: list[str] = field(default_factory=list)
    capacity: dict = field(default_factory=dict)  # max_num_seqs, num_blocks, block_size, max_model_len
    mig_device: str | None = None  # the GPU or MIG slice UUID it runs on
    started: float = field(default_factory=time.time)
    backend_mode: str = "accelerator"  # or "cpu_fallback": only small prompts (runtime/failover.py)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> WorkerRecord:
        values = json.loads(raw)
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class PoolConfig:
    weight: float = 1.0
    drain: bool = False

    @classmethod
    def from_json(cls, raw: bytes) -> PoolConfig:
        try:
            values = json.loads(raw)
            return cls(float(values.get("weight", 1.0)), bool(values.get("drain", False)))
        except (ValueError, TypeError, AttributeError):
            log.warning("ignoring a malformed pool key: %r", raw[:200])
            return cls()


def model_digest(model_dir: str | Path) -> str:
    """SHA-256 over the folder's file names and sizes and its config and tokenizer files: equal
    digests mean the same model without reading gigabytes of weights on every start."""
    folder = Path(model_dir)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        h.update(f"{name}\0{path.stat().st_size}\0".encode())
        if path.suffix in (".json", ".jinja") and path.stat().st_size < 64 * 2**20:
            h.update(path.read_bytes())
    return h.hexdigest()


def connect(endpoint: str) -> aetcd.Client:
    """`endpoint`: host:port of etcd's client URL."""
    host, _, port = endpoint.removeprefix("http://").rpartition(":")
    return aetcd.Client(host=host or "127.0.0.1", port=int(port))


class KvSummary:
    """The block keys a worker holds, newest last; the etcd copy is the newest KV_SUMMARY_KEYS."""

    def __init__(self):
        self.keys: OrderedDict[bytes, None] = OrderedDict()
        self.version = 0  # bumped on every change

    def apply(self, event) -> None:
        if isinstance(event, BlockStored):
            for key in event.keys:
                self.keys[key] = None
                self.keys.move_to_end(key)
        elif isinstance(event, BlockRemoved):
            for key in event.keys:
                self.keys.pop(key, None)
        elif isinstance(event, AllBlocksCleared):
            self.keys.clear()
        self.version += 1

    def to_json(self, block_size: int) -> bytes:
        newest = list(self.keys)[-KV_SUMMARY_KEYS:]
        return json.dumps({"block_size": block_size, "num_cached_blocks": len(self.keys),
                           "keys": [k.hex() for k in newest], "updated": time.time()}).encode()


class WorkerRegistration:
    """A worker's lease, its record and its KV summary in etcd, kept alive until `close`."""

    def __init__(self, client: aetcd.Client, record: WorkerRecord, lease_ttl_s: float = 2.0):
        self.client, self.record, self.ttl = client, record, max(1, round(lease_ttl_s))
        self.summary = KvSummary()
        self.writes = 0  # puts made (record, summaries, re-registrations): the etcd write rate
        self._lease = None
        self._written_version = -1
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self._register()
        self._task = asyncio.ensure_future(self._keep_alive())

    async def _register(self) -> None:
        self._lease = await self.client.lease(self.ttl)
        await self.client.put(WORKERS.encode() + self.record.worker_id.encode(), self.record.to_json(),
                              lease=self._lease)
        self.writes += 1
        self._written_version = -1  # the summary went with any old lease
        log.info("registered worker %s at %s (lease %x, ttl %ds)", self.record.worker_id, self.record.address,
                 self._lease.id, self.ttl)

    async def _keep_alive(self) -> None:
        period = self.ttl / 3
        next_summary = 0.0
        while True:
            try:
                reply = await self._lease.refresh()
                if reply.TTL <= 0:  # expired (a long pause): register again
                    log.warning("worker %s: lease expired; registering again", self.record.worker_id)
                    await self._register()
                now = time.monotonic()
                if now >= next_summary and self.summary.version != self._written_version:
                    version = self.summary.version
                    await self.client.put(KV.encode() + self.record.worker_id.encode(),
                                          self.summary.to_json(self.record.capacity.get("block_size", 0)),
                                          lease=self._lease)
                    self.writes += 1
                    self._written_version, next_summary = version, now + KV_SUMMARY_PERIOD_S
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - etcd away for a moment: keep trying
                log.warning("worker %s: etcd keep-alive failed: %r", self.record.worker_id, e)
            await asyncio.sleep(min(period, KV_SUMMARY_PERIOD_S))

    async def update(self) -> None:
        """Write the record again (a field changed: the backend mode)."""
        if self._lease is not None:
            await self.client.put(WORKERS.encode() + self.record.worker_id.encode(), self.record.to_json(),
                                  lease=self._lease)
            self.writes += 1

    async def close(self) -> None:
        """Revoke the lease: the record and summary vanish now, not at the TTL."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await self._lease.revoke()
