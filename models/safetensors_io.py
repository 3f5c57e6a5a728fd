"""Memory-mapped reading of safetensors checkpoints, single-file or sharded.

The format is small enough to read directly: 8 bytes of little-endian header length, a
JSON header {name: {dtype, shape, data_offsets}}, then the raw tensor bytes. Reading it
here lets every tensor be a zero-copy numpy view of the mapped file (bfloat16 included,
through ml_dtypes), and lets a truncated or corrupt file be named before any weight loads.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one file's header; nothing but the header is read."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path.name}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise CheckpointError(
                    f"{path.name}: corrupt or truncated safetensors file "
                    f"(header of {header_len} bytes in a file of {size})"
                )
            raw = f.read(header_len)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path.name}: file not found in {path.parent}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path.name}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_info(path, name, meta, data_start, size)
    return tensors


def _tensor_info(path: Path, name: str, meta, data_start: int, file_size: int) -> TensorInfo:
    if isinstance(meta, dict) and isinstance(meta.get("dtype"), str) and meta["dtype"] not in _DTYPES:
        raise CheckpointError(f"{path.name}: tensor {name!r} has dtype {meta['dtype']}, which is not supported")
    try:
        dtype = _DTYPES[meta["dtype"]]
        shape = tuple(int(d) for d in meta["shape"])
        begin, end = (int(o) for o in meta["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path.name}: corrupt header entry for tensor {name!r}: {meta!r}") from e
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != expected or begin < 0:
        raise CheckpointError(f"{path.name}: tensor {name!r} has {end - begin} bytes, its shape {shape} needs {expected}")
    if data_start + end > file_size:
        raise CheckpointError(
            f"{path.name}: truncated: tensor {name!r} ends at byte {data_start + end}, the file has {file_size}"
        )
    return TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)


def index_checkpoint(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint in `model_dir`, from its index or its single file."""
    index_path = model_dir / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{INDEX_NAME}: not a valid index ({e})") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise CheckpointError(f"shard file {missing[0]} named in {INDEX_NAME} is missing from {model_dir}")
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in read_header(model_dir / f).items():
                if weight_map.get(name) == f:
                    tensors[name] = info
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"tensor {absent[0]!r} is listed in {INDEX_NAME} under {weight_map[absent[0]]} but not in that file")
        return tensors
    single = model_dir / SINGLE_NAME
    if not single.is_file():
        raise CheckpointError(f"no {SINGLE_NAME} or {INDEX_NAME} in {model_dir}")
    return read_header(single)


class MappedFiles:
    """Keeps one read-only memory map per file; tensors are views into them."""

    def __init__(self):
        self._maps: dict[Path, np.memmap] = {}

    def view(self, info: TensorInfo) -> np.ndarray:
        mm = self._maps.get(info.file)
        if mm is None:
            mm = self._maps[info.file] = np.memmap(info.file, dtype=np.uint8, mode="r")
        return mm[info.start : info.end].view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        self._maps.clear()
