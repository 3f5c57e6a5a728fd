"""Load a Hugging Face checkpoint folder into a sharded, ready-to-run model.

Everything is checked before any weight is read: config fields, the presence and shape
of every tensor, shard files, safetensors headers against file sizes, and the tokenizer's
ids against the vocabulary. Each parameter is then built shard by shard with
`jax.make_array_from_callback`, each device reading only its slice of the memory-mapped
file, so no full host copy of the model is ever made.

The weights arrive in the checkpoint layout (`models/projection.py`); `lay_out` then builds
the layout an execution plan chose for one device (fused, packed, a tied head's copy).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from models.config import ModelConfig
from models.kv_cache import KVCache, allocate_kv_cache
from models.llama import CausalLM
from models.projection import CHECKPOINT_LAYOUT, WeightLayout
from models.safetensors_io import INDEX_NAME, CheckpointError, MappedFiles, TensorInfo, index_checkpoint
from models.sharding import KV_CACHE_AXES, ShardingRules, make_mesh
from models.weight_map import WeightSource, ignorable, weight_source

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ORBAX_DIR = "tessera_params"  # written by `tessera convert`


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    graphdef: nnx.GraphDef
    state: nnx.State
    dtype: jnp.dtype
    mesh: Mesh
    rules: ShardingRules
    load_seconds: float = 0.0
    layout: WeightLayout = CHECKPOINT_LAYOUT

    def kv_cache_sharding(self, num_pages: int, page_size: int) -> NamedSharding:
        shape = (num_pages, page_size, self.cfg.num_kv_heads, self.cfg.head_dim)
        return self.rules.sharding(KV_CACHE_AXES, shape, self.mesh)

    def allocate_kv_cache(self, num_pages: int, page_size: int) -> KVCache:
        cfg = self.cfg
        return allocate_kv_cache(
            cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim, self.dtype,
            self.kv_cache_sharding(num_pages, page_size),
        )


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    path: tuple
    shape: tuple[int, ...]
    axes: tuple[str, ...]


def abstract_model(cfg: ModelConfig, dtype) -> tuple[nnx.GraphDef, nnx.State, list[ParamSpec]]:
    """Graph definition, shape-only state and every parameter's spec, allocating nothing."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, dtype)))
    specs = [
        ParamSpec(tuple(path), tuple(var.get_value().shape), tuple(var.get_metadata()["out_sharding"]))
        for path, var in nnx.to_flat_state(state)
    ]
    return graphdef, state, specs


def resolve_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


def load_model(
    model_dir: str | Path,
    dtype: str | jnp.dtype = "float32",
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
    max_token_id: int | None = None,
) -> LoadedModel:
    """`max_token_id`: the tokenizer's highest id, refused if the model has no row for it."""
    started = time.perf_counter()
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    if max_token_id is not None and max_token_id >= cfg.vocab_size:
        raise CheckpointError(
            f"the tokenizer has ids up to {max_token_id} but the model's vocab_size is {cfg.vocab_size}"
        )
    dtype = resolve_dtype(dtype)
    mesh = mesh or make_mesh(1)
    rules = rules or ShardingRules()
    graphdef, state, specs = abstract_model(cfg, dtype)
    shardings = {s.path: rules.sharding(s.axes, s.shape, mesh) for s in specs}
    if (model_dir / ORBAX_DIR).is_dir():
        from models.orbax_store import restore_params  # orbax takes ~0.2 s to import: only for its folders

        arrays = restore_params(model_dir / ORBAX_DIR, specs, shardings, dtype)
    else:
        arrays = _read_safetensors(model_dir, cfg, specs, shardings, dtype)
    for path, var in nnx.to_flat_state(state):
        var.set_value(arrays[tuple(path)])
    jax.block_until_ready(jax.tree.leaves(state))
    seconds = time.perf_counter() - started
    log.info("loaded %s (%s) in %.2fs", model_dir, cfg.architecture, seconds)
    return LoadedModel(cfg, graphdef, state, dtype, mesh, rules, seconds)


def lay_out(model: LoadedModel, layout: WeightLayout) -> LoadedModel:
    """`model`, loaded in the checkpoint layout, with its weights in `layout`: q/k/v and gate/up
    side by side, every projection read by `layout.linear`'s products (packed for the packed
    kernel; float8 with a scale per output channel for fp8), and a tied head copied as [embed,
    vocab] for the CPU kernels. The checkpoint's arrays are freed with the model they came in,
    once the caller lets it go."""
    if layout == model.layout:
        return model
    if model.layout != CHECKPOINT_LAYOUT or not layout.fused or model.mesh.size != 1:
        raise ValueError(f"a model held as {model.layout} on {model.mesh.size} devices cannot be laid out as "
                         f"{layout}; fused layouts are made from the checkpoint layout on one device")
    module = nnx.merge(model.graphdef, model.state)
    for layer in module.layers:
        attn = layer.self_attn
        attn.qkv = attn.qkv.fused(layout)
        attn.o_proj = layout.projection(attn.o_proj.kn())
        layer.mlp = layer.mlp.fused(layout)
    if layout.linear != "xla":  # XLA reads a tied head from the embedding itself; the kernels want their own copy
        module.lm_head = layout.projection(module.lm_head.kn())
    graphdef, state = nnx.split(module)
    jax.block_until_ready(jax.tree.leaves(state))
    return dataclasses.replace(model, graphdef=graphdef, state=state, layout=layout)


def _read_safetensors(
    model_dir: Path,
    cfg: ModelConfig,
    specs: list[ParamSpec],
    shardings: dict[tuple, NamedSharding],
    dtype: jnp.dtype,
) -> dict[tuple, jax.Array]:
    tensors = index_checkpoint(model_dir)
    sources = {s.path: weight_source(cfg, s.path) for s in specs}
    _check_tensors(cfg, tensors, sources)
    files = MappedFiles()
    try:
        return {
            s.path: _place(files.view(tensors[sources[s.path].hf_name]), sources[s.path], s, shardings[s.path], dtype)
            for s in specs
        }
    finally:
        files.close()


def _check_tensors(cfg: ModelConfig, tensors: dict[str, TensorInfo], sources: dict[tuple, WeightSource]) -> None:
    wanted = {src.hf_name: src for src in sources.values()}
    for name, src in wanted.items():
        info = tensors.get(name)
        if info is None:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
        if info.shape != src.hf_shape:
            raise CheckpointError(
                f"tensor {name!r} in {info.file.name} has shape {list(info.shape)}, "
                f"the config needs {list(src.hf_shape)}"
            )
        if not np.issubdtype(info.dtype, np.floating) and info.dtype.name != "bfloat16":
            raise CheckpointError(f"tensor {name!r} has dtype {info.dtype}, expected a floating type")
    extra = sorted(n for n in tensors if n not in wanted and not ignorable(cfg, n))
    if extra:
        raise CheckpointError(
            f"tensor {extra[0]!r} in {tensors[extra[0]].file.name} is not part of a {cfg.architecture} "
            f"with this config ({len(extra)} unexpected tensors)"
        )


def _place(
    hf_view: np.ndarray, source: WeightSource, spec: ParamSpec, sharding: NamedSharding, dtype: jnp.dtype
) -> jax.Array:
    view = source.to_model(hf_view)  # still a view of the mapped file
    assert view.shape == spec.shape, (source.hf_name, view.shape, spec.shape)
    np_dtype = np.dtype(dtype)
    return jax.make_array_from_callback(
        spec.shape, sharding, lambda index: np.ascontiguousarray(view[index], dtype=np_dtype)
    )


def convert_checkpoint(model_dir: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> float:
    """Write `model_dir` as a Tessera folder with orbax weights; returns the seconds taken."""
    import shutil

    from models.orbax_store import save_params

    started = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = load_model(model_dir, dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != INDEX_NAME:
            shutil.copy2(f, out_dir / f.name)
    arrays = {tuple(path): var.get_value() for path, var in nnx.to_flat_state(model.state)}
    save_params(out_dir / ORBAX_DIR, arrays)
    return time.perf_counter() - started
