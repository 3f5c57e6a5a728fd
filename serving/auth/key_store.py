"""Where API key records live: a file for one node, Redis for replicas, memory for tests.

Every store keeps only `ApiKeyRecord`s (salted hashes, never a key). `open_key_store(where)`
takes a path or a `redis://`/`rediss://` URL.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import threading
import time
from pathlib import Path

from serving.auth.keys import ApiKeyRecord
from serving.auth.private_file import write_private_file


class KeyStoreUnavailable(Exception):
    """The store cannot be read or written (Redis down, file unreadable)."""


class MemoryKeyStore:
    def __init__(self):
        self._keys: dict[str, ApiKeyRecord] = {}

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        return self._keys.get(key_id)

    async def add(self, record: ApiKeyRecord) -> None:
        self._keys[record.key_id] = record

    async def list(self, tenant: str | None = None) -> list[ApiKeyRecord]:
        return sorted((r for r in self._keys.values() if tenant is None or r.tenant == tenant),
                      key=lambda r: r.created_at)

    async def revoke(self, key_id: str, when: float | None = None) -> ApiKeyRecord | None:
        record = self._keys.get(key_id)
        if record is not None and record.revoked_at is None:
            record.revoked_at = time.time() if when is None else when
        return record

    async def close(self) -> None:
        pass

    def describe(self) -> str:
        return "memory"


class FileKeyStore:
    """One JSON file, mode 0600, replaced atomically on every change (write a temporary file in
    the same folder, fsync, rename); read again whenever it changed on disk. Writers take an
    advisory lock on `<file>.lock`, so two processes on one node do not lose each other's keys."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._keys: dict[str, ApiKeyRecord] = {}

    def describe(self) -> str:
        return f"file {self.path}"

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        return self._read().get(key_id)

    async def list(self, tenant: str | None = None) -> list[ApiKeyRecord]:
        return sorted((r for r in self._read().values() if tenant is None or r.tenant == tenant),
                      key=lambda r: r.created_at)

    async def add(self, record: ApiKeyRecord) -> None:
        await asyncio.to_thread(self._update, lambda keys: keys.__setitem__(record.key_id, record))

    async def revoke(self, key_id: str, when: float | None = None) -> ApiKeyRecord | None:
        found: list[ApiKeyRecord] = []

        def change(keys: dict[str, ApiKeyRecord]) -> None:
            record = keys.get(key_id)
            if record is not None:
                if record.revoked_at is None:
                    record.revoked_at = time.time() if when is None else when
                found.append(record)

        await asyncio.to_thread(self._update, change)
        return found[0] if found else None

    async def close(self) -> None:
        pass

    def _read(self) -> dict[str, ApiKeyRecord]:
        with self._lock:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                self._stamp, self._keys = None, {}
                return self._keys
            except OSError as e:
                raise KeyStoreUnavailable(f"cannot read {self.path}: {e}") from e
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                self._keys, self._stamp = self._load(), stamp
            return self._keys

    def _load(self) -> dict[str, ApiKeyRecord]:
        try:
            data = json.loads(self.path.read_text())
            return {k: ApiKeyRecord.from_dict(v) for k, v in data.get("keys", {}).items()}
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise KeyStoreUnavailable(f"cannot read the key file {self.path}: {e}") from e

    def _update(self, change) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            with self._lock:
                self._stamp = None  # re-read under the lock: another process may have written
            keys = dict(self._read())
            change(keys)
            self._write(keys)
        finally:
            os.close(lock_fd)

    def _write(self, keys: dict[str, ApiKeyRecord]) -> None:
        write_private_file(self.path, json.dumps({"version": 1, "keys": {k: r.to_dict() for k, r in keys.items()}},
                                                 indent=1))


class RedisKeyStore:
    """`<prefix>key:<id>` holds a record's JSON; the set `<prefix>keys` holds every id."""

    def __init__(self, url: str, prefix: str = "tessera:apikeys:"):
        self.url, self.prefix = url, prefix
        self._client = None
        self._loop = None

    def describe(self) -> str:
        return f"redis {self.url.split('@')[-1]}"  # never the password in a URL

    def _redis(self):
        import redis.asyncio as aioredis

        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = aioredis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
            self._loop = loop
        return self._client

    async def _call(self, fn):
        import redis

        try:
            return await fn(self._redis())
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            raise KeyStoreUnavailable(f"the key store ({self.describe()}) is unreachable: {e}") from e

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        raw = await self._call(lambda r: r.get(f"{self.prefix}key:{key_id}"))
        return ApiKeyRecord.from_dict(json.loads(raw)) if raw else None

    async def add(self, record: ApiKeyRecord) -> None:
        async def write(r):
            async with r.pipeline(transaction=True) as pipe:
                pipe.set(f"{self.prefix}key:{record.key_id}", json.dumps(record.to_dict()))
                pipe.sadd(f"{self.prefix}keys", record.key_id)
                await pipe.execute()

        await self._call(write)

    async def list(self, tenant: str | None = None) -> list[ApiKeyRecord]:
        async def read(r):
            ids = sorted(x.decode() for x in await r.smembers(f"{self.prefix}keys"))
            raws = await r.mget([f"{self.prefix}key:{i}" for i in ids]) if ids else []
            return [ApiKeyRecord.from_dict(json.loads(x)) for x in raws if x]

        records = await self._call(read)
        return sorted((x for x in records if tenant is None or x.tenant == tenant), key=lambda x: x.created_at)

    async def revoke(self, key_id: str, when: float | None = None) -> ApiKeyRecord | None:
        record = await self.get(key_id)
        if record is not None and record.revoked_at is None:
            record.revoked_at = time.time() if when is None else when
            await self._call(lambda r: r.set(f"{self.prefix}key:{key_id}", json.dumps(record.to_dict())))
        return record

    async def close(self) -> None:
        if self._client is not None:
            try:
                await self._client.aclose()
            except RuntimeError:  # the loop it was made on has closed
                pass
            self._client = None


def open_key_store(where: str | None):
    """A path -> FileKeyStore, redis:// or rediss:// -> RedisKeyStore, None -> MemoryKeyStore."""
    if not where:
        return MemoryKeyStore()
    if where.startswith(("redis://", "rediss://", "unix://")):
        return RedisKeyStore(where)
    return FileKeyStore(where)
