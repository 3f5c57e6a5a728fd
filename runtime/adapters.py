"""Served LoRA adapters: the registry by name, and the device slots they are copied into.

Names and versions: loading `sql` makes version `sql@1`; loading `sql` again (a replacement)
makes `sql@2` and retires `sql@1`. A request is bound to a version when it is made
(`Request.adapter_id`), so it finishes on the adapter it started with however often the name
is reloaded, and prefix-cache keys (which include `adapter_id`) never mix versions. A retired
or unloaded version stays in host memory until no request holds it (`sweep`).

Slots: `max_loras` device slots (slot 0 is "no adapter"). Before each step `activate` copies
the step's adapters into slots, evicting the least recently used adapter the step does not
need; every loaded adapter stays in host memory, so an evicted one is copied back on its next
use. The engine admits no sequence that would make the running batch need more than
`max_loras` adapters. Registry calls are safe from any thread; `activate` and `sweep` run on
the engine's loop thread, between steps.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import jax

from models.config import ModelConfig
from models.lora import LoraAdapter, LoraStacks, empty_stacks, read_adapter, write_slot


BIND_GRACE_S = 30.0


class AdapterNotFound(LookupError):
    """A request or an unload named an adapter that is not loaded."""


@dataclass
class AdapterVersion:
    name: str
    version_id: str  # name@n: what requests and prefix-cache keys carry
    path: str
    adapter: LoraAdapter
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)
    retired: bool = False
    hits: int = 0  # requests that found it in a device slot
    misses: int = 0  # requests that had it copied from host memory first
    last_used: float | None = None


@dataclass
class AdapterCounters:
    loads: int = 0
    load_failures: int = 0
    unloads: int = 0
    evictions: int = 0  # device slots taken from an adapter for another
    hits: int = 0
    misses: int = 0
    load_seconds: float = 0.0  # summed over successful loads


class AdapterManager:
    def __init__(self, cfg: ModelConfig, max_loras: int, max_rank: int, dtype,
                 sharding: jax.sharding.Sharding | None = None):
        """`sharding`: where the stacks live; with tensor parallelism, replicated over the mesh
        (each device then computes the products for its own heads and MLP columns)."""
        if max_loras < 1 or max_rank < 1:
            raise ValueError(f"max_loras={max_loras} and max_lora_rank={max_rank} must be >= 1")
        self.cfg, self.max_loras, self.max_rank = cfg, max_loras, max_rank
        self.stacks: LoraStacks = empty_stacks(cfg, max_loras + 1, max_rank, dtype)
        if sharding is not None:
            self.stacks = jax.device_put(self.stacks, sharding)
        self.stacks = write_slot(self.stacks, 0, None)  # compiles the slot update now, not at a first load
        self.counters = AdapterCounters()
        self._lock = threading.Lock()  # guards _current, _versions, counters' registry fields
        self._current: dict[str, AdapterVersion] = {}  # name -> the version new requests get
        self._versions: dict[str, AdapterVersion] = {}  # version id -> every version still held
        self._numbers = itertools.count(1)
        self._bound: dict[str, float] = {}  # version id -> when a request was last bound to it
        self._slots: OrderedDict[str, int] = OrderedDict()  # version id -> slot, least recently used first
        self._free = list(range(max_loras, 0, -1))

    # -- the registry (any thread) ---------------------------------------------------------

    def load(self, name: str, path: str | Path) -> AdapterVersion:
        """Read and check the folder, then serve it under `name` (replacing a loaded one).
        Raises AdapterError (models/lora.py) and changes nothing when the folder is refused."""
        started = time.perf_counter()
        try:
            adapter = read_adapter(path, self.cfg, self.max_rank)
        except Exception:
            with self._lock:
                self.counters.load_failures += 1
            raise
        seconds = time.perf_counter() - started
        with self._lock:
            version = AdapterVersion(name, f"{name}@{next(self._numbers)}", str(path), adapter, seconds)
            old = self._current.get(name)
            if old is not None:
                old.retired = True
            self._current[name] = self._versions[version.version_id] = version
            self.counters.loads += 1
            self.counters.load_seconds += seconds
        return version

    def unload(self, name: str) -> AdapterVersion:
        """New requests for `name` get 404 from now on; running ones finish on it."""
        with self._lock:
            version = self._current.pop(name, None)
            if version is None:
                raise AdapterNotFound(name)
            version.retired = True
            self.counters.unloads += 1
        return version

    def resolve(self, name: str) -> str:
        """The version id a new request for `name` is bound to."""
        with self._lock:
            version = self._current.get(name)
            if version is None:
                raise AdapterNotFound(name)
            self._bound[version.version_id] = time.monotonic()
        return version.version_id

    def served(self) -> list[AdapterVersion]:
        with self._lock:
            return sorted(self._current.values(), key=lambda v: v.name)

    def snapshot(self) -> dict:
        """For /debug/adapters: every version held, its slot, hits and last use."""
        with self._lock:
            versions = list(self._versions.values())
            slots = dict(self._slots)
        return {
            "max_loras": self.max_loras, "max_lora_rank": self.max_rank,
            "free_slots": self.max_loras - len(slots),
            "adapters": [{
                "name": v.name, "version": v.version_id, "path": v.path, "rank": v.adapter.rank,
                "targets": list(v.adapter.targets), "retired": v.retired, "slot": slots.get(v.version_id),
                "hits": v.hits, "misses": v.misses, "last_used": v.last_used, "loaded_at": v.loaded_at,
                "load_seconds": round(v.load_seconds, 4), "host_bytes": v.adapter.nbytes,
            } for v in versions],
        }

    # -- the loop thread -------------------------------------------------------------------

    def slot_of(self, version_id: str) -> int:
        return self._slots[version_id] if version_id else 0

    def is_resident(self, version_id: str) -> bool:
        return version_id in self._slots

    def note_request(self, version_id: str) -> None:
        """A request for this version was queued: a hit if its weights are on the device."""
        if not version_id:
            return
        with self._lock:
            version = self._versions.get(version_id)
            if version is None:
                return
            resident = version_id in self._slots
            version.hits += resident
            version.misses += not resident
            version.last_used = time.time()
            self.counters.hits += resident
            self.counters.misses += not resident

    def activate(self, version_ids: set[str]) -> None:
        """Put every adapter of the next step in a device slot."""
        for version_id in version_ids - {""}:
            if version_id in self._slots:
                self._slots.move_to_end(version_id)
                continue
            if not self._free:
                victim = next((v for v in self._slots if v not in version_ids), None)
                if victim is None:
                    raise RuntimeError(f"a step needs more than max_loras={self.max_loras} adapters")
                self._free.append(self._slots.pop(victim))
                self.counters.evictions += 1
            with self._lock:
                version = self._versions[version_id]
            slot = self._free.pop()
            self.stacks = write_slot(self.stacks, slot, version.adapter)
            self._slots[version_id] = slot

    def sweep(self, live: set[str], grace_s: float = BIND_GRACE_S) -> None:
        """Forget retired versions no request holds any more, and free their slots. A version a
        request was bound to in the last `grace_s` is kept: that request may be on its way from
        the caller's thread to the engine's (made, not yet queued)."""
        now = time.monotonic()
        with self._lock:
            dead = [v for v, version in self._versions.items()
                    if version.retired and v not in live and now - self._bound.get(v, -1e9) > grace_s]
            for version_id in dead:
                del self._versions[version_id]
                self._bound.pop(version_id, None)
        for version_id in dead:
            if version_id in self._slots:
                self._free.append(self._slots.pop(version_id))

    @property
    def has_retired(self) -> bool:
        with self._lock:
            return any(v.retired for v in self._versions.values())


@runtime_checkable
class AdapterHost(Protocol):
    """An engine client that serves adapters and reloads its base model (runtime/async_engine.py's
    AsyncEngine); serving checks for it rather than reaching into the engine."""

    @property
    def adapters(self) -> AdapterManager | None: ...

    async def load_adapter(self, name: str, path: str) -> AdapterVersion: ...

    def unload_adapter(self, name: str) -> AdapterVersion: ...

    @property
    def model_version(self) -> int: ...

    async def reload_model(self, model_dir: str, drain_timeout_s: float = 120.0) -> tuple[int, float, float]: ...
