"""PEFT LoRA adapters: read from a folder, checked against the model, and applied per token.

An adapter folder is what `peft`'s `save_pretrained` writes: `adapter_config.json` and
`adapter_model.safetensors` holding, per adapted linear layer, `lora_A.weight` [r, in] and
`lora_B.weight` [out, r]. PEFT computes `y = W x + (alpha / r) * B A x` (`alpha / sqrt(r)`
with rsLoRA; `rank_pattern` and `alpha_pattern` give single layers their own r and alpha).

Served adapters sit in stacked slots, one stack per target, of fixed shape:

    a: [layers, slots, in, max_rank]    b: [layers, slots, max_rank, out]

Slot 0 is all zeros and means "no adapter". An adapter of rank r < max_rank fills the first r
columns of `a` and rows of `b` (the rest stay zero, so they add exactly nothing), and its
scaling is folded into `b` at load. The stacks are arguments of the jitted step, so loading an
adapter replaces arrays of the same shape and never compiles.

The product per token (`lora_delta`): each token computes the shrink x @ A for every slot, keeps
its own slot's (a one-hot mask; the others become exact zeros) and expands with B. On CPU this
costs `slots` small products instead of one, which at max_rank 16-64 and a few slots is cheap
beside the base weights. GPUs run the gathered Pallas kernels of `kernels/lora_bgmv.py` (Punica's
BGMV/SGMV: each token reads only its own slot) instead; `LoraInputs.kernel` says which.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from kernels.lora_bgmv import lora_bgmv
from models.config import ModelConfig
from models.safetensors_io import CheckpointError, MappedFiles, read_header

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.(" + "|".join(TARGETS) + r")\.lora_([AB])\.weight$")


class AdapterError(ValueError):
    """An adapter the server cannot take; the message says which file or tensor, and why."""


def target_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer an adapter may target."""
    e, m = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q_proj": (e, q), "k_proj": (e, kv), "v_proj": (e, kv), "o_proj": (q, e),
            "gate_proj": (e, m), "up_proj": (e, m), "down_proj": (m, e)}


@dataclass
class LoraAdapter:
    """One adapter on the host, padded to the server's max rank, scaling folded into b."""

    rank: int  # the largest rank of its layers
    targets: tuple[str, ...]
    a: dict[str, np.ndarray]  # target -> [layers, in, max_rank] float32
    b: dict[str, np.ndarray]  # target -> [layers, max_rank, out] float32

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in (*self.a.values(), *self.b.values()))


def read_adapter(path: str | Path, cfg: ModelConfig, max_rank: int) -> LoraAdapter:
    """Read and check a PEFT LoRA folder. Raises AdapterError naming what the server cannot take."""
    folder = Path(path)
    config = _read_config(folder)
    tensors = _read_tensors(folder / WEIGHTS_NAME)
    shapes = target_shapes(cfg)
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, array in tensors.items():
        match = _KEY.match(name)
        if match is None:
            raise AdapterError(f"{WEIGHTS_NAME}: tensor {name!r} is not a LoRA weight of "
                               f"{', '.join(TARGETS)} (embeddings, the head and saved modules are not served)")
        layer, target, which = int(match[1]), match[3], match[4]
        if layer >= cfg.num_layers:
            raise AdapterError(f"{WEIGHTS_NAME}: {name!r} is for layer {layer}; the model has {cfg.num_layers}")
        pairs.setdefault((layer, target), {})[which] = array
    if not pairs:
        raise AdapterError(f"{WEIGHTS_NAME} holds no LoRA weights")
    targets = tuple(t for t in TARGETS if any(t == tt for _, tt in pairs))
    a = {t: np.zeros((cfg.num_layers, shapes[t][0], max_rank), np.float32) for t in targets}
    b = {t: np.zeros((cfg.num_layers, max_rank, shapes[t][1]), np.float32) for t in targets}
    top_rank = 0
    for (layer, target), ab in sorted(pairs.items()):
        module = f"layers.{layer}.{target}"
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{WEIGHTS_NAME}: {module} has lora_{next(iter(ab))} without its pair")
        lora_a, lora_b = ab["A"], ab["B"]
        rank, (fan_in, fan_out) = lora_a.shape[0], shapes[target]
        if lora_a.shape != (rank, fan_in) or lora_b.shape != (fan_out, rank):
            raise AdapterError(f"{WEIGHTS_NAME}: {module} has lora_A {lora_a.shape} and lora_B {lora_b.shape}; "
                               f"this model needs [r, {fan_in}] and [{fan_out}, r]")
        if rank > max_rank:
            raise AdapterError(f"{module} has rank {rank}; this server takes ranks up to {max_rank} (--max-lora-rank)")
        if not (np.isfinite(lora_a).all() and np.isfinite(lora_b).all()):
            raise AdapterError(f"{WEIGHTS_NAME}: {module} holds NaN or infinite values")
        top_rank = max(top_rank, rank)
        a[target][layer, :, :rank] = lora_a.T
        parent = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        b[target][layer, :rank, :] = lora_b.T * _scaling(config, f"model.layers.{layer}.{parent}.{target}", rank)
    return LoraAdapter(top_rank, targets, a, b)


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise AdapterError(f"{folder} has no {CONFIG_NAME}: not a PEFT adapter folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{CONFIG_NAME} cannot be read: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_NAME} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type {config.get('peft_type')!r} is not served; only LORA")
    refusals = {
        "use_dora": "DoRA adapters are not served",
        "modules_to_save": "adapters that save whole modules (modules_to_save) are not served",
        "layers_to_transform": "layers_to_transform is not supported",
    }
    for key, reason in refusals.items():
        if config.get(key):
            raise AdapterError(f"{CONFIG_NAME}: {reason}")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{CONFIG_NAME}: bias={config['bias']!r} is not served; only 'none'")
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"{CONFIG_NAME}: fan_in_fan_out (Conv1D models) is not served")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterError(f"{CONFIG_NAME}: lora_alpha={alpha!r} must be a number")
    return config


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise AdapterError(f"{path.parent} has no {WEIGHTS_NAME} (only safetensors are read, never pickles)")
    files = MappedFiles()
    try:
        return {name: np.asarray(files.view(info), np.float32) for name, info in read_header(path).items()}
    except CheckpointError as e:
        raise AdapterError(str(e)) from None
    except (OSError, ValueError, TypeError) as e:
        raise AdapterError(f"{WEIGHTS_NAME} cannot be read: {e}") from None
    finally:
        files.close()


def _scaling(config: dict, module: str, rank: int) -> float:
    """PEFT's scaling of one module: its alpha over r, or over sqrt(r) with rsLoRA."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if _pattern_matches(pattern, module):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _pattern_matches(pattern: str, module: str) -> bool:
    """PEFT's rule for rank_pattern/alpha_pattern keys: a suffix of the module's dotted name."""
    return module == pattern or module.endswith("." + pattern) or re.fullmatch(rf"(.*\.)?{pattern}", module) is not None


# -- on the device --------------------------------------------------------------------------

LoraStacks = dict[str, dict[str, jax.Array]]
"""target -> {"a": [layers, slots, in, max_rank], "b": [layers, slots, max_rank, out]}."""


def empty_stacks(cfg: ModelConfig, num_slots: int, max_rank: int, dtype) -> LoraStacks:
    """Zeroed stacks for every target (slot 0 stays zero: no adapter)."""
    L = cfg.num_layers
    return {t: {"a": jnp.zeros((L, num_slots, fan_in, max_rank), dtype),
                "b": jnp.zeros((L, num_slots, max_rank, fan_out), dtype)}
            for t, (fan_in, fan_out) in target_shapes(cfg).items()}


@jax.jit
def _write_slot(stacks: LoraStacks, slot: Int[Array, ""], a: dict, b: dict) -> LoraStacks:
    out = {}
    for target, stack in stacks.items():
        new_a = a.get(target, jnp.zeros_like(stack["a"][:, 0]))
        new_b = b.get(target, jnp.zeros_like(stack["b"][:, 0]))
        out[target] = {"a": stack["a"].at[:, slot].set(new_a.astype(stack["a"].dtype)),
                       "b": stack["b"].at[:, slot].set(new_b.astype(stack["b"].dtype))}
    return out


def write_slot(stacks: LoraStacks, slot: int, adapter: LoraAdapter | None) -> LoraStacks:
    """New stacks with `adapter` in `slot` (zeros for None). The old arrays are untouched, so a
    step already dispatched with them computes with what it was given."""
    zeros = {t: np.zeros(s["a"].shape[:1] + s["a"].shape[2:], np.float32) for t, s in stacks.items()}
    zeros_b = {t: np.zeros(s["b"].shape[:1] + s["b"].shape[2:], np.float32) for t, s in stacks.items()}
    a = {**zeros, **(adapter.a if adapter else {})}
    b = {**zeros_b, **(adapter.b if adapter else {})}
    return _write_slot(stacks, jnp.int32(slot), a, b)


LORA_KERNELS = ("xla", "pallas", "pallas_interpret")
"""How the product runs: `lora_delta` below (any device), the Pallas kernels of
`kernels/lora_bgmv.py` through Triton (GPUs), or those kernels in the Pallas interpreter (tests)."""


@dataclass(frozen=True)
class LoraInputs:
    """What the forward pass needs for adapters: each token's slot, the stacks, and (static,
    part of the pytree's structure) which implementation computes the product."""

    slots: Int[Array, " tokens"]
    stacks: LoraStacks
    kernel: str = "xla"

    def layer(self, i: int) -> LoraLayer:
        return LoraLayer(self.slots, self.stacks, i, self.kernel)


jax.tree_util.register_pytree_node(
    LoraInputs, lambda x: ((x.slots, x.stacks), x.kernel), lambda kernel, c: LoraInputs(*c, kernel))


@dataclass(frozen=True)
class LoraLayer:
    slots: Int[Array, " tokens"]
    stacks: LoraStacks
    index: int  # the layer
    kernel: str

    def delta(self, target: str, x: Float[Array, "tokens k"]) -> Float[Array, "tokens n"]:
        a, b = self.stacks[target]["a"], self.stacks[target]["b"]
        if self.kernel == "xla":
            mask = jax.nn.one_hot(self.slots, a.shape[1], dtype=a.dtype)
            return lora_delta(x, a[self.index], b[self.index], mask).astype(x.dtype)
        # the whole stacks go in with the layer as an operand: one compiled kernel for every layer
        return lora_bgmv(x.astype(a.dtype), a, b, self.slots, self.index,
                         interpret=self.kernel == "pallas_interpret").astype(x.dtype)


def lora_delta(
    x: Float[Array, "tokens k"],
    a: Float[Array, "slots k r"],
    b: Float[Array, "slots r n"],
    mask: Float[Array, "tokens slots"],
) -> Float[Array, "tokens n"]:
    """Each token's B A x with its own slot's weights (slot 0: zeros)."""
    with jax.named_scope("lora"):
        shrink = jnp.einsum("tk,skr->tsr", x.astype(a.dtype), a) * mask[:, :, None]
        return jnp.einsum("tsr,srn->tn", shrink, b)
