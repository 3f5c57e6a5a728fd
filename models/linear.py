"""The model's weight products, and the switch that sends small ones to the CPU kernel.

`linear(x, w, impl)` is `x @ w` (or `x @ w.T` for a [N, K] weight with `transposed`). With
impl "cpu", bfloat16 weights and at most `MAX_ROWS` rows, the product runs in
`kernels/cpu/linear.cc`: XLA CPU emulates bfloat16 products (~1.5 GB/s of weights on a
decode step's shapes against ~13 GB/s for the kernel, BUILD_NOTES.md). Prompt-sized
products stay with XLA, which does them at float32 speed.

`use_cpu_linear(model)` marks a loaded single-device CPU model's modules with impl "cpu"
(a static attribute: part of the graph definition, so it is fixed at trace time).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from kernels.cpu_library import available
from kernels.linear_cpu import MAX_ROWS, linear_cpu

if TYPE_CHECKING:  # models.loader imports the model, which imports this module
    from models.loader import LoadedModel

log = logging.getLogger(__name__)
ENV_VAR = "TESSERA_CPU_LINEAR"  # "0" keeps every product in XLA


def linear(x: Float[Array, "rows k"], w: Float[Array, "..."], impl: str = "xla", *,
           transposed: bool = False) -> Float[Array, "rows n"]:
    # float32 stays with XLA: in a whole decode step its one-thread products beat the kernel,
    # whose per-call thread hand-off costs tens of microseconds (BUILD_NOTES.md).
    if impl == "cpu" and x.shape[0] <= MAX_ROWS and w.dtype == jnp.bfloat16:
        return linear_cpu(x, w, transposed=transposed)
    return x @ (w.T if transposed else w)


def use_cpu_linear(model: LoadedModel) -> LoadedModel:
    """The model with its projections on the CPU kernel, when it runs on one CPU device and
    the kernel library builds; otherwise the model unchanged."""
    if os.environ.get(ENV_VAR, "1") == "0" or model.mesh.size != 1:
        return model
    if model.mesh.devices.flat[0].platform != "cpu" or not available():
        return model
    module = nnx.merge(model.graphdef, model.state)
    module.linear_impl = "cpu"
    for layer in module.layers:
        layer.self_attn.linear_impl = "cpu"
        layer.mlp.linear_impl = "cpu"
    graphdef, state = nnx.split(module)
    log.info("small-batch projections run in the CPU kernel (%s=0 to keep them in XLA)", ENV_VAR)
    return dataclasses.replace(model, graphdef=graphdef, state=state)


__all__ = ["MAX_ROWS", "linear", "use_cpu_linear"]
