"""Converted weights saved and restored with orbax-checkpoint.

`tessera convert` writes the parameters in Tessera's own layout (already transposed and
cast), so a restore reads each device's shard straight into place with no layout work.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding

from models.safetensors_io import CheckpointError


def _key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def save_params(directory: Path, arrays: dict[tuple, jax.Array]) -> None:
    tree = {_key(path): array for path, array in arrays.items()}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(Path(directory).absolute(), tree)
        ckpt.wait_until_finished()


def restore_params(directory: Path, specs, shardings: dict[tuple, NamedSharding], dtype) -> dict[tuple, jax.Array]:
    target = {
        _key(s.path): jax.ShapeDtypeStruct(s.shape, dtype, sharding=shardings[s.path]) for s in specs
    }
    try:
        with ocp.StandardCheckpointer() as ckpt:
            tree = ckpt.restore(Path(directory).absolute(), target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{directory}: the converted weights do not match config.json ({e})") from e
    return {s.path: tree[_key(s.path)] for s in specs}
