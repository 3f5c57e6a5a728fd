"""Logical axis names -> mesh axes. The same model runs on one device or on a mesh.

Tensor parallelism splits attention heads, KV heads, the MLP hidden axis and the
vocabulary over the mesh's `model` axis. A dimension the axis does not divide stays
replicated (e.g. 2 KV heads on 8 devices), which keeps any head count servable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MODEL_AXIS = "model"


@dataclass(frozen=True)
class ShardingRules:
    rules: dict[str, str | None] = field(
        default_factory=lambda: {
            "heads": MODEL_AXIS,
            "kv_heads": MODEL_AXIS,
            "mlp": MODEL_AXIS,
            "vocab": MODEL_AXIS,
            "embed": None,
            "head_dim": None,
        }
    )

    def spec(self, axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
        parts = []
        for name, size in zip(axes, shape, strict=True):
            mesh_axis = self.rules.get(name) if name else None
            if mesh_axis is not None and (mesh_axis not in mesh.shape or size % mesh.shape[mesh_axis]):
                mesh_axis = None
            parts.append(mesh_axis)
        return PartitionSpec(*parts)

    def sharding(self, axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
        return NamedSharding(mesh, self.spec(axes, shape, mesh))


def make_mesh(tensor_parallel: int = 1, devices: list | None = None) -> Mesh:
    """A one-axis mesh of `tensor_parallel` devices with automatic sharding propagation."""
    devices = list(devices if devices is not None else jax.devices())
    if tensor_parallel < 1 or tensor_parallel > len(devices):
        raise ValueError(f"tensor_parallel={tensor_parallel} but {len(devices)} devices are visible")
    # Built directly (not jax.make_mesh, whose axes default to Explicit in recent jax):
    # the model relies on GSPMD propagating shardings from the weights.
    return Mesh(np.array(devices[:tensor_parallel]), (MODEL_AXIS,))


KV_CACHE_AXES = (None, None, "kv_heads", "head_dim")  # [pages, page_size, kv_heads, head_dim]
