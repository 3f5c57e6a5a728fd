"""The model's weight products, and the switch that sends small ones to the CPU kernel.

`linear(x, w, impl)` is `x @ w` (or `x @ w.T` for a [N, K] weight with `transposed`). With
impl "cpu" and at most `MAX_ROWS` rows, the product runs in `kernels/cpu/linear.cc`: XLA
CPU emulates bfloat16 products (~1.5 GB/s of weights on a decode step's shapes) and runs
float32 matrix-vector products on one thread (BUILD_NOTES.md). Prompt-sized products stay
with XLA.

With impl "packed" (a bfloat16 model) the weight is packed for `kernels/cpu/packed_linear.cc`,
which serves every row count, prompt chunks included, on whatever this CPU has (AMX tiles,
AVX-512 BF16, or bfloat16 widened in AVX2/AVX-512 registers): XLA CPU emulates bfloat16
products at a few GB/s of weights.

`use_cpu_linear(model)` marks a loaded single-device CPU model's modules with the impl (a
static attribute: part of the graph definition, so it is fixed at trace time).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from kernels.packed_linear import pack_weight, packable, packed_linear
from kernels.cpu_library import available
from kernels.linear_cpu import MAX_ROWS, linear_cpu
from kernels.qkv_rope_cpu import qkv_rope_cpu
from models.rope import apply_rope

if TYPE_CHECKING:  # models.loader imports the model, which imports this module
    from models.loader import LoadedModel

log = logging.getLogger(__name__)
ENV_VAR = "TESSERA_CPU_LINEAR"  # "0" keeps every product in XLA


def linear(x: Float[Array, "rows k"], w: Float[Array, "..."], impl: str = "xla", *,
           transposed: bool = False) -> Float[Array, "rows n"]:
    if impl == "packed":  # w was packed by use_cpu_linear, and every row count goes to the kernel
        return packed_linear(x, w)
    if impl == "cpu" and x.shape[0] <= MAX_ROWS:
        return linear_cpu(x, w, transposed=transposed)
    return x @ (w.T if transposed else w)


def gated_linear(gate_up: Float[Array, "rows two_m"], w: Float[Array, "..."], impl: str = "xla") -> Float[Array, "rows n"]:
    """silu(gate) * up @ w for gate_up = [gate | up] side by side (an MLP's down projection).
    The packed kernel computes the activation while it rounds its operand to bfloat16."""
    if impl == "packed":
        return packed_linear(gate_up, w, gated=True)
    m = gate_up.shape[1] // 2
    return linear(jax.nn.silu(gate_up[:, :m]) * gate_up[:, m:], w, impl)


def qkv_with_rope(
    x: Float[Array, "tokens embed"], w: Float[Array, "..."], impl: str, positions: Int[Array, " tokens"],
    inv_freq: Float[Array, " half"], heads: int, kv_heads: int,
) -> tuple[Float[Array, "tokens heads d"], Float[Array, "tokens kv d"], Float[Array, "tokens kv d"]]:
    """q and k rotated, and v, of a fused q/k/v projection: one kernel call with impl "packed" (or
    "cpu" up to MAX_ROWS rows), else the product, the split and `apply_rope` in XLA."""
    d = 2 * inv_freq.shape[0]
    if impl == "packed" or (impl == "cpu" and x.shape[0] <= MAX_ROWS):
        # cos/sin rounded to the activations' dtype first, as transformers (and apply_rope) do.
        freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
        cos, sin = (f(freqs).astype(x.dtype).astype(jnp.float32) for f in (jnp.cos, jnp.sin))
        return qkv_rope_cpu(x, w, cos, sin, heads, kv_heads, packed=impl == "packed")
    qkv = linear(x, w, impl)
    q, k, v = (part.reshape(x.shape[0], -1, d) for part in jnp.split(qkv, [heads * d, (heads + kv_heads) * d], axis=1))
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def use_cpu_linear(model: LoadedModel) -> LoadedModel:
    """The model with its projections on the CPU kernels, when it runs on one CPU device and
    the kernel library builds; otherwise the model unchanged. bfloat16 models get their
    weights packed ("packed", every row count); float32 ones use the small-batch kernel
    ("cpu") for decode-sized products and XLA for prompt chunks."""
    if os.environ.get(ENV_VAR, "1") == "0" or model.mesh.size != 1:
        return model
    if model.mesh.devices.flat[0].platform != "cpu" or not available():
        return model
    module = nnx.merge(model.graphdef, model.state)
    impl = "packed" if model.dtype == jnp.bfloat16 and _pack_weights(module) else "cpu"
    module.linear_impl = impl
    if impl == "cpu" and module.cfg.tie_word_embeddings:
        # The tied head as a [K, N] copy: the kernel streams that layout faster at a decode
        # step's rows (float32, one row: ~3.0 vs ~5.5 ms for a 49,152 x 576 head); the
        # price is a second copy of the embedding, as the packed path's head is.
        module.lm_head_kn = nnx.Param(jnp.asarray(module.embed_tokens[...].T))
    for layer in module.layers:
        layer.self_attn.linear_impl = impl
        layer.mlp.linear_impl = impl
    graphdef, state = nnx.split(module)
    log.info("projections run in the CPU kernels (%s; %s=0 to keep them in XLA)", impl, ENV_VAR)
    return dataclasses.replace(model, graphdef=graphdef, state=state)


def _pack_weights(module) -> bool:
    """Packs every projection of a fused model for the packed kernel, in place; False (and
    nothing changed) when one cannot be packed."""
    head = module.embed_tokens[...].T if module.cfg.tie_word_embeddings else module.lm_head[...]
    weights = [head]
    for layer in module.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not hasattr(attn, "qkv_proj") or not hasattr(mlp, "gate_up_proj"):
            return False
        h, d, e = attn.o_proj.shape
        weights += [attn.qkv_proj[...], attn.o_proj[...].reshape(h * d, e), mlp.gate_up_proj[...], mlp.down_proj[...]]
    if not all(packable(w) for w in weights):
        return False
    module.lm_head_packed = nnx.Param(pack_weight(head))
    for layer in module.layers:
        attn, mlp = layer.self_attn, layer.mlp
        h, d, e = attn.o_proj.shape
        attn.qkv_proj = nnx.Param(pack_weight(attn.qkv_proj[...]))
        attn.o_proj = nnx.Param(pack_weight(attn.o_proj[...].reshape(h * d, e)))
        mlp.gate_up_proj = nnx.Param(pack_weight(mlp.gate_up_proj[...]))
        mlp.down_proj = nnx.Param(pack_weight(mlp.down_proj[...]))
    if not module.cfg.tie_word_embeddings:
        del module.lm_head
    return True


__all__ = ["MAX_ROWS", "gated_linear", "linear", "qkv_with_rope", "use_cpu_linear"]
