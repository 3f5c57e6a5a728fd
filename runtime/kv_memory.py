"""The KV cache sized from the device's memory: vLLM's `--gpu-memory-utilization`.

The fraction covers weights, activations and KV cache together. After the weights are on
the device (and adapters' slots), the engine reads jax's allocator statistics and the
workspace of the largest step program (compiled once on a probe cache, runtime/runner.py
`workspace_bytes`), and the KV cache gets the rest:

    budget = min(utilization x device memory, jax's pool) - in use - workspace - headroom

jax's GPU allocator holds a pool of XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of the
device; `memory_stats()` reports the pool (`bytes_limit`), not the device, so the device's
memory is the pool over that fraction. `tessera serve` sets the fraction to the utilization
before jax starts its GPU backend (a value the user set wins), so the pool is exactly what
the flag grants. A device without allocator statistics (the CPU) keeps the explicit size.
Plain arithmetic here; jax stays in the caller.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

POOL_FRACTION_VARIABLE = "XLA_PYTHON_CLIENT_MEM_FRACTION"
DEFAULT_POOL_FRACTION = 0.75  # jax's default for that variable
HEADROOM_BYTES = 256 * 2**20  # allocator fragmentation and the runtime's small buffers


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    limit: int
    """Bytes jax's allocator may hold on the device (its pool)."""
    in_use: int
    """Bytes held now: the weights, adapter slots, anything else live."""
    fraction: float
    """The share of the device the pool is (XLA_PYTHON_CLIENT_MEM_FRACTION)."""

    @property
    def total(self) -> int:
        """The device's memory: the pool over its fraction."""
        return int(self.limit / self.fraction)

    def granted(self, utilization: float) -> int:
        """utilization x the device's memory, as far as the pool holds it."""
        return self.limit if utilization >= self.fraction else int(self.limit * utilization / self.fraction)


def pool_fraction(environ: Mapping[str, str] | None = None) -> float:
    environ = os.environ if environ is None else environ
    return float(environ.get(POOL_FRACTION_VARIABLE, DEFAULT_POOL_FRACTION))


def device_memory(stats: Mapping[str, int] | None, fraction: float) -> DeviceMemory | None:
    """From one device's `memory_stats()`; None where the device reports no allocator pool."""
    if not stats or "bytes_limit" not in stats or "bytes_in_use" not in stats:
        return None
    return DeviceMemory(int(stats["bytes_limit"]), int(stats["bytes_in_use"]), fraction)


def kv_cache_budget(memory: DeviceMemory, utilization: float, workspace: int, headroom: int = HEADROOM_BYTES) -> int:
    """Bytes of one device's KV cache (negative when nothing is left)."""
    return memory.granted(utilization) - memory.in_use - workspace - headroom


def apply_pool_fraction(utilization: float, environ: MutableMapping[str, str] | None = None) -> None:
    """Make jax's GPU pool the fraction the flag grants; must run before jax starts its GPU
    backend (later it changes nothing, and the pool caps the budget instead)."""
    environ = os.environ if environ is None else environ
    environ.setdefault(POOL_FRACTION_VARIABLE, f"{utilization:g}")
