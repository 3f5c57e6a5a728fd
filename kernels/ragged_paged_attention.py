"""Ragged paged attention as a Pallas kernel, lowered through Triton for NVIDIA GPUs.

Same arguments and result as `ragged_paged_attention_ref` (the pure-jnp reference in
`ragged_paged_attention_ref.py`, which the CPU backend runs): sequence s brings
q_len[s] = query_start_loc[s+1] - query_start_loc[s] new tokens, already written into its
pages, and attends causally to its first context_lens[s] cached tokens.

Shape of the work. A *work item* is one sequence's run of up to `block_q` consecutive query
tokens; the grid is (kv_heads, work items). A program takes the `block_q * group` query
rows that share one KV head (the row r is token r // group, head r % group of the group),
walks the sequence's pages `pages_per_block` at a time through its block table, and keeps an
online softmax in registers. Every program writes its own slab of the output, so no two
programs ever write the same bytes and no store needs a mask; a gather in XLA puts the
rows back in token order. Work items are computed in XLA from query_start_loc: the grid
has a fixed size per shape bucket (seqs + ceil(tokens / block_q)), and items past the
batch's real count run no loop iterations.

Decode-only steps (tokens <= seqs) take 16-row programs: one token's group of heads; mixed
or prefill steps take 64 rows, so a chunk's queries share each page they read. A decode
step with few sequences would leave most multiprocessors idle, so its programs also split
each context into `kv_splits` ranges (a third grid axis) and write float32 partial sums
with their softmax max and sum; XLA merges the ranges.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

SUPPORTED_HEAD_DIMS = (64, 128)
MAX_GROUP = 8  # query heads per KV head
KEYS_PER_BLOCK = 64  # keys per inner step: pages_per_block = KEYS_PER_BLOCK // page_size
_NEG = -1e30
_LOG2E = math.log2(math.e)
# work-item columns
_SEQ, _QSTART, _QEND, _KVLEN, _POSOFF = range(5)


class UnsupportedAttentionShape(ValueError):
    """The kernel cannot run this shape; the message names what is out of range."""


def check_supported(num_heads: int, num_kv_heads: int, head_dim: int, page_size: int, dtype) -> None:
    """Raise UnsupportedAttentionShape unless the kernel handles these shapes."""
    if num_heads % num_kv_heads:
        raise UnsupportedAttentionShape(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    group = num_heads // num_kv_heads
    if group > MAX_GROUP:
        raise UnsupportedAttentionShape(f"{group} query heads per KV head; the Pallas kernel supports at most {MAX_GROUP}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise UnsupportedAttentionShape(f"head_dim={head_dim}; the Pallas kernel supports {SUPPORTED_HEAD_DIMS}")
    if page_size < 8 or page_size & (page_size - 1):
        raise UnsupportedAttentionShape(f"page size {page_size}; the Pallas kernel needs a power of two >= 8")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise UnsupportedAttentionShape(f"dtype {jnp.dtype(dtype).name}; the Pallas kernel supports float32 and bfloat16")


def ragged_paged_attention(
    q: Float[Array, "tokens heads head_dim"],
    k_pages: Float[Array, "pages page_size kv_heads head_dim"],
    v_pages: Float[Array, "pages page_size kv_heads head_dim"],
    block_tables: Int[Array, "seqs max_blocks"],
    context_lens: Int[Array, " seqs"],
    query_start_loc: Int[Array, " seqs_plus_one"],
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: bool = False,
    block_rows: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    kv_splits: int | None = None,
    poison: float | None = None,
) -> Float[Array, "tokens heads head_dim"]:
    """`poison`, for tests: the programs' output slabs start filled with this value (e.g.
    NaN), so a row a program should have written and did not shows up in the result."""
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    num_seqs, max_blocks = block_tables.shape
    check_supported(num_heads, num_kv_heads, head_dim, page_size, k_pages.dtype)
    group = num_heads // num_kv_heads
    if block_rows is None:
        block_rows = 16 if num_tokens <= num_seqs else 64
    block_q = block_rows // group  # whole tokens per program; the rows past block_q * group idle
    pages_per_block = max(1, KEYS_PER_BLOCK // page_size)
    num_work = num_seqs + -(-num_tokens // block_q)

    work = _work_items(query_start_loc, context_lens, block_q, num_work)
    # [kv_heads, tokens * group (+ a block of padding so every program's rows are in bounds), D]
    q_rows = q.reshape(num_tokens, num_kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    q_rows = q_rows.reshape(num_kv_heads, num_tokens * group, head_dim)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, block_rows), (0, 0)))
    table_cols = -(-max_blocks // pages_per_block) * pages_per_block
    tables = jnp.pad(block_tables, ((0, 0), (0, table_cols - max_blocks)))

    if kv_splits is None:
        kv_splits = _default_kv_splits(num_tokens, num_seqs, num_kv_heads)
    kernel = functools.partial(
        _attention_kernel,
        group=group,
        block_rows=block_rows,
        pages_per_block=pages_per_block,
        kv_splits=kv_splits,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        precision=jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
    )
    # Split programs write float32 partial sums and their softmax (max, sum) rows; XLA merges them.
    split = kv_splits > 1
    slab_shape = (kv_splits, num_work, num_kv_heads, block_rows, head_dim)
    slab_dtype = jnp.float32 if split else q.dtype
    operands = [work, tables, q_rows, k_pages, v_pages]
    slab_spec = pl.BlockSpec((None, None, None, block_rows, head_dim), lambda h, i, s: (s, i, h, 0, 0))
    stat_spec = pl.BlockSpec((None, None, None, block_rows), lambda h, i, s: (s, i, h, 0))
    whole = lambda shape: pl.BlockSpec(shape, lambda h, i, s: (0,) * len(shape))  # noqa: E731
    pages_spec = pl.BlockSpec((k_pages.shape[0], page_size, None, head_dim), lambda h, i, s: (0, 0, h, 0))
    out_shape = [jax.ShapeDtypeStruct(slab_shape, slab_dtype)]
    if split:
        out_shape += [jax.ShapeDtypeStruct(slab_shape[:-1], jnp.float32)] * 2
    outs = pl.pallas_call(
        kernel,
        grid=(num_kv_heads, num_work, kv_splits),
        in_specs=[
            whole(work.shape),
            whole(tables.shape),
            pl.BlockSpec((None, q_rows.shape[1], head_dim), lambda h, i, s: (h, 0, 0)),
            pages_spec,
            pages_spec,
        ]
        + ([slab_spec] if poison is not None else []),
        out_specs=[slab_spec] + [stat_spec] * (2 if split else 0),
        out_shape=out_shape,
        input_output_aliases={len(operands): 0} if poison is not None else {},
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name=f"ragged_paged_attention_r{block_rows}_g{group}_d{head_dim}_s{kv_splits}",
    )(*operands, *([jnp.full(slab_shape, poison, slab_dtype)] if poison is not None else []))
    slabs = _merge_splits(*outs) if split else outs[0][0]
    return _tokens_from_slabs(slabs.astype(q.dtype), work, query_start_loc, num_tokens, group, block_q)


def _default_kv_splits(num_tokens: int, num_seqs: int, num_kv_heads: int) -> int:
    """Decode steps with few sequences have too few (sequence, KV head) programs to fill a
    GPU's ~100+ multiprocessors; such steps split each context into up to 16 ranges."""
    if num_tokens > num_seqs:
        return 1
    programs = num_seqs * num_kv_heads
    return max(1, min(16, 256 // programs))


def _merge_splits(acc, row_max, row_sum):
    """Combine per-split online-softmax partials: acc [splits, ..., D], max and sum [splits, ...]
    (max in log2 units). A split that saw no key has sum 0 and weighs nothing."""
    top = jnp.max(row_max, axis=0)
    weight = jnp.exp2(row_max - top)
    total = jnp.sum(weight * row_sum, axis=0)
    merged = jnp.sum(weight[..., None] * acc, axis=0)
    return merged / jnp.where(total > 0, total, 1.0)[..., None]


def _work_spans(query_start_loc, block_q: int):
    """Each sequence's work items are [starts[s], ends[s]): ceil(q_len / block_q) of them."""
    q_len = query_start_loc[1:] - query_start_loc[:-1]
    ends = jnp.cumsum((q_len + block_q - 1) // block_q)
    return ends - (q_len + block_q - 1) // block_q, ends


def _work_items(query_start_loc, context_lens, block_q: int, num_work: int) -> Int[Array, "work 5"]:
    """[num_work, 5] int32 rows (seq, first token, end token, kv_len, position offset); the
    rows past the batch's real work have kv_len 0, so their programs read nothing."""
    num_seqs = context_lens.shape[0]
    starts, ends = _work_spans(query_start_loc, block_q)
    w = jnp.arange(num_work, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(ends, w, side="right"), 0, num_seqs - 1).astype(jnp.int32)
    real = w < ends[-1]
    first = query_start_loc[seq] + (w - starts[seq]) * block_q
    end = jnp.minimum(first + block_q, query_start_loc[seq + 1])
    kv_len = jnp.where(real, context_lens[seq], 0)
    pos_offset = context_lens[seq] - query_start_loc[seq + 1]  # position of token t = t + pos_offset
    return jnp.stack([seq, first, end, kv_len, pos_offset], axis=1).astype(jnp.int32)


def _attention_kernel(
    work_ref,  # [work, 5] int32
    tables_ref,  # [seqs, table_cols] int32
    q_ref,  # [rows, head_dim], this KV head's query rows
    k_ref,  # [pages, page_size, head_dim], this KV head's keys
    v_ref,  # [pages, page_size, head_dim]
    *out_refs,  # [poisoned slab aliased to the output,] output [rows, head_dim] [, row max, row sum]
    group: int,
    block_rows: int,
    pages_per_block: int,
    kv_splits: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    precision,
):
    i, split = pl.program_id(1), pl.program_id(2)
    seq = work_ref[i, _SEQ]
    first, end = work_ref[i, _QSTART], work_ref[i, _QEND]
    kv_len, pos_offset = work_ref[i, _KVLEN], work_ref[i, _POSOFF]
    page_size, head_dim = k_ref.shape[1], k_ref.shape[2]
    block_keys = pages_per_block * page_size

    q = q_ref[pl.ds(first * group, block_rows), :]
    q_pos = first + pos_offset + jnp.arange(block_rows, dtype=jnp.int32) // group
    # Keys this block can see: up to its last real query, and from the window's start.
    key_end = jnp.minimum(kv_len, end + pos_offset)
    key_start = 0 if sliding_window is None else jnp.maximum(0, first + pos_offset - sliding_window + 1)

    def visit(j, carry):
        acc, row_max, row_sum = carry
        pages = tables_ref[seq, pl.ds(j * pages_per_block, pages_per_block)]
        k = k_ref[pages].reshape(block_keys, head_dim)
        v = v_ref[pages].reshape(block_keys, head_dim)
        scores = _dot(q, k, ((1,), (1,)), precision) * sm_scale  # q k^T: [rows, keys] float32
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        k_pos = j * block_keys + jnp.arange(block_keys, dtype=jnp.int32)
        visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < kv_len)
        if sliding_window is not None:
            visible &= k_pos[None, :] > q_pos[:, None] - sliding_window
        scores = jnp.where(visible, scores * _LOG2E, _NEG)
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))
        probs = jnp.where(visible, jnp.exp2(scores - new_max[:, None]), 0.0)
        rescale = jnp.exp2(row_max - new_max)
        acc = acc * rescale[:, None] + _dot(probs.astype(v.dtype), v, ((1,), (0,)), precision)
        return acc, new_max, row_sum * rescale + jnp.sum(probs, axis=1)

    start = jnp.minimum(key_start, key_end) // block_keys if sliding_window is not None else 0
    stop = (key_end + block_keys - 1) // block_keys
    if kv_splits > 1:  # this program's share of the key blocks
        share = (stop - start + kv_splits - 1) // kv_splits
        start = jnp.minimum(stop, start + split * share)
        stop = jnp.minimum(stop, start + share)
    init = (
        jnp.zeros((block_rows, head_dim), jnp.float32),
        jnp.full((block_rows,), _NEG, jnp.float32),
        jnp.zeros((block_rows,), jnp.float32),
    )
    acc, row_max, row_sum = jax.lax.fori_loop(start, stop, visit, init)
    if kv_splits > 1:
        acc_ref, max_ref, sum_ref = out_refs[-3:]
        acc_ref[...] = acc
        max_ref[...] = row_max
        sum_ref[...] = row_sum
    else:
        o_ref = out_refs[-1]
        o_ref[...] = (acc / jnp.where(row_sum > 0, row_sum, 1.0)[:, None]).astype(o_ref.dtype)


def _dot(a, b, contracting, precision):
    # lax.dot_general rather than pl.dot, which jax 0.11 removed; float32 accumulation.
    return jax.lax.dot_general(a, b, (contracting, ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _tokens_from_slabs(slabs, work, query_start_loc, num_tokens: int, group: int, block_q: int):
    """[work, kv_heads, rows, D] program slabs -> [tokens, heads, D]; padding tokens get 0."""
    num_work, num_kv_heads, _, head_dim = slabs.shape
    num_seqs = query_start_loc.shape[0] - 1
    per_token = slabs[:, :, : block_q * group].reshape(num_work, num_kv_heads, block_q, group, head_dim)
    starts, _ = _work_spans(query_start_loc, block_q)
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(query_start_loc[1:], t, side="right"), 0, num_seqs - 1)
    offset = t - query_start_loc[seq]
    item = jnp.clip(starts[seq] + offset // block_q, 0, num_work - 1)
    out = per_token[item, :, offset % block_q]  # [tokens, kv_heads, group, D]
    real = t < query_start_loc[num_seqs]
    return jnp.where(real[:, None, None, None], out, 0).reshape(num_tokens, num_kv_heads * group, head_dim)
