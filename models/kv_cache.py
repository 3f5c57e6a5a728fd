"""The paged KV cache and the per-step metadata that tells attention where to look."""

from __future__ import annotations

import dataclasses
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

# Built on the host as numpy and handed straight to the jitted step, or traced inside it.
HostOrDevice = Union[Array, np.ndarray]

# One (keys, values) pair of pages per layer, each [pages, page_size, kv_heads, head_dim].
LayerKV = tuple[Float[Array, "pages page_size kv_heads head_dim"], Float[Array, "pages page_size kv_heads head_dim"]]
KVCache = list[LayerKV]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where a ragged batch's tokens go and what they see. Built by the runner on the host."""

    slot_mapping: Int[HostOrDevice, " tokens"]  # cache slot (page * page_size + offset) per token; -1 = padding
    block_tables: Int[HostOrDevice, "seqs max_blocks"]  # page ids of each sequence, in order
    context_lens: Int[HostOrDevice, " seqs"]  # cached tokens per sequence after this step's writes
    query_start_loc: Int[HostOrDevice, " seqs_plus_one"]  # sequence s owns tokens [qsl[s], qsl[s+1])
    # The Pallas kernel's work table for this step (kernels/attention_work.py), built once on the
    # host and shared by every layer; None: the kernel builds it itself (other backends ignore it).
    work: Int[HostOrDevice, "entries cols"] | None = None
    # Static: which implementation attends ("reference", "cpu", "pallas", "pallas_interpret"); see
    # runtime/backend.py. Part of the pytree's structure, so each choice compiles once.
    backend: str = dataclasses.field(default="reference", metadata=dict(static=True))
    # Static: the tensor-parallel mesh when a Pallas kernel must run per device under
    # shard_map (XLA cannot split a custom call); None leaves partitioning to XLA.
    mesh: jax.sharding.Mesh | None = dataclasses.field(default=None, metadata=dict(static=True))


def allocate_kv_cache(
    num_layers: int,
    num_pages: int,
    page_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: jnp.dtype,
    sharding: jax.sharding.Sharding | None = None,
) -> KVCache:
    # jnp.zeros, never jnp.empty: from jax 0.11 on, empty is uninitialised memory.
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return [(make(), make()) for _ in range(num_layers)]
