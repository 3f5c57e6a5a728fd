"""The gathered LoRA product as Pallas kernels, lowered through Triton for NVIDIA GPUs.

For each token t with adapter slot s = slots[t] (slot 0: no adapter, zeros):

    y[t] = (x[t] @ A[layer, s]) @ B[layer, s]       A: [layers, slots, in, r], B: [layers, slots, r, out]

the same as `models/lora.py` `lora_delta` (the XLA form, which computes every token against
every slot and masks). Here each program reads only the slots its tokens use, in the manner
of Punica's kernels, in two passes (shrink x @ A into a float32 [tokens, r], then expand with B):

- BGMV (one token per program, for decode-sized batches and ranks below 16): the token's slot
  is a scalar, the products are matrix-vector (multiply and sum, no tensor cores); a token
  of slot 0 reads no adapter weights at all.
- SGMV (16 tokens per program, for larger batches): a prefill chunk's tokens share one
  adapter, so a block usually holds one or two slots. The program loops over the slots and,
  for each one present in its block, multiplies the block's rows of that slot (the others
  masked to zeros) with that slot's weights on the tensor cores. Weights of absent slots are
  never read.

The shrink splits the input width over a second grid axis when there are few token programs
(a decode step of a few tokens would otherwise leave most multiprocessors idle); XLA sums
the float32 partials. The stacks are passed whole with the layer as a runtime operand, so
every layer runs the same compiled kernel and no layer's slice is copied out first.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

SGMV_BLOCK = 16  # tokens per SGMV program: the least row count of a tensor-core product
MAX_BLOCK = 128  # widest slice of the input or output width one loop step takes
TARGET_PROGRAMS = 128  # shrink programs to aim for (about one per multiprocessor)


class UnsupportedLoraShape(ValueError):
    """The kernels cannot run these shapes; the message says what is out of range."""


def check_supported(fan_in: int, fan_out: int, max_rank: int, dtype) -> None:
    """Raise UnsupportedLoraShape unless the kernels take a target of these shapes. Triton's
    blocks are powers of two: the widths must split into such blocks, the rank must be one."""
    for name, width in (("input width", fan_in), ("output width", fan_out)):
        if width % 16:
            raise UnsupportedLoraShape(f"{name} {width} is not a multiple of 16")
    if max_rank < 1 or max_rank & (max_rank - 1):
        raise UnsupportedLoraShape(f"max LoRA rank {max_rank} is not a power of two (--max-lora-rank)")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise UnsupportedLoraShape(f"dtype {jnp.dtype(dtype).name}; the LoRA kernels take float32 and bfloat16")


def lora_bgmv(
    x: Float[Array, "tokens k"],
    a: Float[Array, "layers slots k r"],
    b: Float[Array, "layers slots r n"],
    slots: Int[Array, " tokens"],
    layer: int | Int[Array, ""],
    *,
    interpret: bool = False,
    block_tokens: int | None = None,
    k_splits: int | None = None,
    num_warps: int = 4,
) -> Float[Array, "tokens n"]:
    """Each token's B A x with its own slot's weights of `layer`, in x's dtype.
    `block_tokens` 1 is BGMV, 16 is SGMV; None chooses by the batch (see the module doc)."""
    num_tokens, fan_in = x.shape
    _, num_slots, _, rank = a.shape
    fan_out = b.shape[-1]
    check_supported(fan_in, fan_out, rank, a.dtype)
    if block_tokens is None:
        block_tokens = 1 if num_tokens <= SGMV_BLOCK or rank < 16 else SGMV_BLOCK
    if block_tokens not in (1, SGMV_BLOCK) or (block_tokens > 1 and rank < 16):
        raise UnsupportedLoraShape(f"block_tokens={block_tokens} with rank {rank}: 1, or {SGMV_BLOCK} for ranks >= 16")
    padded = -(-num_tokens // block_tokens) * block_tokens
    x = jnp.pad(x, ((0, padded - num_tokens), (0, 0)))
    slots = jnp.pad(slots.astype(jnp.int32), (0, padded - num_tokens))  # padding rows take slot 0: nothing read
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    token_blocks = padded // block_tokens
    block_k, block_n = _block(fan_in), _block(fan_out)
    k_blocks = fan_in // block_k
    if k_splits is None:
        k_splits = max(1, min(k_blocks, TARGET_PROGRAMS // token_blocks))
    per_split = -(-k_blocks // k_splits)
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=2)
    rows = None if block_tokens == 1 else block_tokens  # None: the token axis squeezed away
    mode = "bgmv" if block_tokens == 1 else "sgmv"

    partials = pl.pallas_call(
        functools.partial(_shrink_kernel, block_tokens=block_tokens, block_k=block_k, per_split=per_split,
                          num_slots=num_slots, precision=precision),
        grid=(token_blocks, k_splits),
        out_specs=pl.BlockSpec((None, rows, rank), lambda t, s: (s, t, 0)),
        out_shape=jax.ShapeDtypeStruct((k_splits, padded, rank), jnp.float32),
        interpret=interpret,
        compiler_params=params,
        name=f"lora_{mode}_shrink_r{rank}",
    )(layer, slots, x, a)
    shrunk = jnp.sum(partials, axis=0) if k_splits > 1 else partials[0]
    y = pl.pallas_call(
        functools.partial(_expand_kernel, block_tokens=block_tokens, block_n=block_n, num_slots=num_slots,
                          precision=precision),
        grid=(token_blocks, fan_out // block_n),
        out_specs=pl.BlockSpec((rows, block_n), lambda t, j: (t, j)),
        out_shape=jax.ShapeDtypeStruct((padded, fan_out), x.dtype),
        interpret=interpret,
        compiler_params=params,
        name=f"lora_{mode}_expand_r{rank}",
    )(layer, slots, shrunk, b)
    return y[:num_tokens]


def _block(width: int) -> int:
    """The widest power of two up to MAX_BLOCK that divides `width` (a multiple of 16)."""
    block = MAX_BLOCK
    while width % block:
        block //= 2
    return block


def _shrink_kernel(layer_ref, slots_ref, x_ref, a_ref, o_ref, *, block_tokens, block_k, per_split, num_slots,
                   precision):
    t, split = pl.program_id(0), pl.program_id(1)
    layer = layer_ref[0]
    k_blocks = x_ref.shape[1] // block_k
    first = split * per_split
    last = jnp.minimum(first + per_split, k_blocks)
    rank = a_ref.shape[-1]
    if block_tokens == 1:
        slot = slots_ref[t]

        def step(j, acc):
            k0 = pl.multiple_of(j * block_k, block_k)
            xv = x_ref[t, pl.ds(k0, block_k)].astype(jnp.float32)
            av = a_ref[layer, slot, pl.ds(k0, block_k), :].astype(jnp.float32)
            return acc + jnp.sum(xv[:, None] * av, axis=0)

        # slot 0 (no adapter) runs no iterations and writes zeros
        o_ref[...] = jax.lax.fori_loop(first, jnp.where(slot > 0, last, first), step, jnp.zeros((rank,), jnp.float32))
        return
    t0 = t * block_tokens
    row_slots = slots_ref[pl.ds(t0, block_tokens)]

    def per_slot(s, acc):
        mine = row_slots == s

        def step(j, acc):
            k0 = pl.multiple_of(j * block_k, block_k)
            xv = x_ref[pl.ds(t0, block_tokens), pl.ds(k0, block_k)]
            xv = jnp.where(mine[:, None], xv, jnp.zeros_like(xv))  # other slots' rows add exact zeros
            return acc + _dot(xv, a_ref[layer, s, pl.ds(k0, block_k), :], precision)

        return jax.lax.fori_loop(first, jnp.where(_any(mine), last, first), step, acc)

    o_ref[...] = jax.lax.fori_loop(1, num_slots, per_slot, jnp.zeros((block_tokens, rank), jnp.float32))


def _expand_kernel(layer_ref, slots_ref, s_ref, b_ref, o_ref, *, block_tokens, block_n, num_slots, precision):
    t, j = pl.program_id(0), pl.program_id(1)
    layer = layer_ref[0]
    n0 = pl.multiple_of(j * block_n, block_n)
    if block_tokens == 1:
        slot = slots_ref[t]

        def expand(_):
            sv = s_ref[t, :]
            bv = b_ref[layer, slot, :, pl.ds(n0, block_n)].astype(jnp.float32)
            return jnp.sum(sv[:, None] * bv, axis=0)

        y = jax.lax.cond(slot > 0, expand, lambda _: jnp.zeros((block_n,), jnp.float32), None)
        o_ref[...] = y.astype(o_ref.dtype)
        return
    t0 = t * block_tokens
    row_slots = slots_ref[pl.ds(t0, block_tokens)]
    sv = s_ref[pl.ds(t0, block_tokens), :]

    def per_slot(s, acc):
        mine = row_slots == s

        def add(acc):
            bv = b_ref[layer, s, :, pl.ds(n0, block_n)]
            rows = jnp.where(mine[:, None], sv, jnp.zeros_like(sv)).astype(bv.dtype)
            return acc + _dot(rows, bv, precision)

        return jax.lax.cond(_any(mine), add, lambda acc: acc, acc)

    y = jax.lax.fori_loop(1, num_slots, per_slot, jnp.zeros((block_tokens, block_n), jnp.float32))
    o_ref[...] = y.astype(o_ref.dtype)


def _any(mask):
    # a max over int32: Triton has no boolean or-reduction in Pallas' lowering
    return jnp.max(mask.astype(jnp.int32)) > 0


def _dot(a, b, precision):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)
