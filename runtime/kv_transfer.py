"""Pages between the device's KV cache and the host, for the tiers below it (runtime/kv_tiers.py).

One block's K/V on the host is an array [layers, 2 (keys, values), page_size, kv_heads,
head_dim]. Page counts are padded to one of PAGE_BUCKETS so each direction compiles two
programs, not one per count (they compile in well under the second the persistent cache
asks for, so each start compiles them again: few is fast); padded reads repeat page 0,
padded writes go to an index past the end, which the scatter drops.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from models.kv_cache import KVCache

PAGE_BUCKETS = (4, 32)
MAX_PAGES_PER_CALL = PAGE_BUCKETS[-1]


def _padded(n: int) -> int:
    return next(b for b in PAGE_BUCKETS if b >= n)


@jax.jit
def _gather(kv_cache: KVCache, ids: Int[Array, " n"]) -> Float[Array, "n layers 2 page_size kv_heads head_dim"]:
    return jnp.stack([jnp.stack([k[ids], v[ids]], axis=1) for k, v in kv_cache], axis=1)


@partial(jax.jit, donate_argnames=("kv_cache",))
def _scatter(kv_cache: KVCache, ids: Int[Array, " n"],
             data: Float[Array, "n layers 2 page_size kv_heads head_dim"]) -> KVCache:
    return [(k.at[ids].set(data[:, i, 0].astype(k.dtype), mode="drop"),
             v.at[ids].set(data[:, i, 1].astype(v.dtype), mode="drop"))
            for i, (k, v) in enumerate(kv_cache)]


def read_pages(kv_cache: KVCache, page_ids: list[int]) -> np.ndarray:
    """The pages' K/V on the host, [len(page_ids), layers, 2, page_size, kv_heads, head_dim]."""
    parts = []
    for at in range(0, len(page_ids), MAX_PAGES_PER_CALL):
        chunk = page_ids[at : at + MAX_PAGES_PER_CALL]
        ids = np.zeros(_padded(len(chunk)), np.int32)
        ids[: len(chunk)] = chunk
        parts.append(np.asarray(jax.device_get(_gather(kv_cache, ids)))[: len(chunk)])
    return np.concatenate(parts) if parts else np.zeros((0,))


def write_pages(kv_cache: KVCache, page_ids: list[int], data: np.ndarray) -> KVCache:
    """A new cache with the pages set (the old one is donated: never use it again)."""
    num_pages = kv_cache[0][0].shape[0]
    for at in range(0, len(page_ids), MAX_PAGES_PER_CALL):
        chunk = page_ids[at : at + MAX_PAGES_PER_CALL]
        n = _padded(len(chunk))
        ids = np.full(n, num_pages, np.int32)  # past the end: dropped
        ids[: len(chunk)] = chunk
        block = np.zeros((n, *data.shape[1:]), data.dtype)
        block[: len(chunk)] = data[at : at + len(chunk)]
        kv_cache = _scatter(kv_cache, ids, block)
    return kv_cache


def warm_up(kv_cache: KVCache) -> KVCache:
    """Compile both directions for every padded count (writes page ids past the end: no change)."""
    num_pages = kv_cache[0][0].shape[0]
    for n in PAGE_BUCKETS:
        data = np.asarray(jax.device_get(_gather(kv_cache, np.zeros(n, np.int32))))
        kv_cache = _scatter(kv_cache, np.full(n, num_pages, np.int32), data)
    return kv_cache
