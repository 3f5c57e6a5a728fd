"""Ragged paged attention as Pallas kernels, lowered through Triton for NVIDIA GPUs.

Same arguments and result as `ragged_paged_attention_ref` (the pure-jnp reference in
`ragged_paged_attention_ref.py`): sequence s brings q_len[s] = query_start_loc[s+1] -
query_start_loc[s] new tokens, already written into its pages, and attends causally to its
first context_lens[s] cached tokens; tokens past query_start_loc[-1] are padding and get 0.
One more, optional, argument: the step's work table (`kernels/attention_work.py`), which
the runner builds once per step on the host and every layer shares; without it the kernel
builds the same table in XLA.

Two passes, each one pallas_call over a (KV heads, table entries) grid:
1. decode pass, over the decode entries: a program takes one query token's `group` heads
   of one KV head (padded to 16 rows, the smallest tensor-core tile) and walks its entry's
   range of key blocks. A token whose context was split over several entries (a step with
   few decodes, so that every multiprocessor has work) writes float32 partial sums with
   their softmax max and sum; an unsplit one writes its rows straight into the output.
2. second pass: the chunk entries, each up to `block_q` tokens of one sequence as 64 rows
   (token-major, heads of the group within), so a chunk's queries share every page read;
   the padding entries, which write zeros; then one program per split token, which merges
   its partials and writes its rows. A one-token step (and a caller that promises only
   decodes, `decode_only`) has no chunk entries and this pass only merges.
Outputs go straight to their rows of the [tokens * heads, head_dim] result with masked
stores (the row of token t, head h*group + g is t*heads + h*group + g), so the query is only
reshaped, never transposed or padded, and nothing is gathered afterwards. Every row is
written by exactly one program. The result buffer is aliased from pass to pass.

Keys come `block_keys` at a time (`pages_per_block` pages gathered through the block table):
128 where a block of K fits in 32 KiB (bf16 up to head_dim 128), else 64. The online softmax
works in exp2 with the scale folded in, in float32 registers.

Interpret mode (CPU tests) runs each masked store as a read-modify-write of whole rows, so
masked lanes must not land on a row another lane of the same store writes: there the result
has 64 spare rows at the end for them, cut off after the last pass. On the GPU masked lanes
write nothing and the result has no spare rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from kernels.attention_work import (
    CHUNK_ROWS, DECODE_ROWS, KEY_START, KEY_STOP, MERGE_COUNT, MERGE_FIRST, POS_OFFSET, Q_END, Q_FIRST, SEQ,
    WORK_COLS, WorkPlan, work_plan, work_table,
)

SUPPORTED_HEAD_DIMS = (64, 128)
MAX_GROUP = 8  # query heads per KV head
DECODE_WARPS = 4
CHUNK_WARPS = 8  # 64 rows x 128 keys of float32 scores and a 64 x 128 accumulator
_NEG = -1e30
_LOG2E = math.log2(math.e)


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


def plan_for(num_tokens: int, num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
             dtype, decode_only: bool = False) -> WorkPlan:
    """The work plan the kernel uses for these shapes: the runner builds its table from it."""
    return work_plan(num_tokens, num_seqs, num_heads // num_kv_heads, head_dim, page_size, dtype,
                     decode_only=decode_only)


@dataclasses.dataclass(frozen=True)
class _Static:
    """What every program knows at trace time."""

    plan: WorkPlan
    heads: int
    rows: int  # tokens * heads: the result's real rows
    spare: int  # extra rows at the end for masked lanes (interpret mode only)
    max_blocks: int  # block-table columns
    sm_scale: float
    sliding_window: int | None
    soft_cap: float | None
    precision: jax.lax.Precision | None


def ragged_paged_attention(
    q: Float[Array, "tokens heads head_dim"],
    k_pages: Float[Array, "pages page_size kv_heads head_dim"],
    v_pages: Float[Array, "pages page_size kv_heads head_dim"],
    block_tables: Int[Array, "seqs max_blocks"],
    context_lens: Int[Array, " seqs"],
    query_start_loc: Int[Array, " seqs_plus_one"],
    work: Int[Array, "entries 8"] | None = None,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: bool = False,
    decode_only: bool = False,
    num_warps: int | None = None,
    num_stages: int = 2,
    poison: float | None = None,
) -> Float[Array, "tokens heads head_dim"]:
    """`work`: the step's table from `attention_work.work_table(plan_for(...), ...)`.
    `decode_only`: every sequence brings at most one token (no chunk entries; a wrong promise
    gives wrong rows). `num_warps`: both passes' warps (default: decode 4, chunks 8).
    `poison`, for tests: the result starts filled with this value (e.g. NaN), so a row no
    program wrote shows up."""
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    num_seqs, max_blocks = block_tables.shape
    check_supported(num_heads, num_kv_heads, head_dim, page_size, k_pages.dtype)
    plan = plan_for(num_tokens, num_seqs, num_heads, num_kv_heads, head_dim, page_size, k_pages.dtype, decode_only)
    if work is None:
        work = work_table(plan, query_start_loc, context_lens, xp=jnp)
    elif work.shape != (plan.rows, WORK_COLS):
        raise ValueError(f"work table of shape {work.shape}; these shapes need {(plan.rows, WORK_COLS)} "
                         f"(kernels/attention_work.py)")
    rows = num_tokens * num_heads
    st = _Static(plan, num_heads, rows, CHUNK_ROWS if interpret else 0, max_blocks, sm_scale, sliding_window,
                 soft_cap, jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None)
    call = functools.partial(pl.pallas_call, interpret=interpret)
    params = lambda warps: plgpu.CompilerParams(num_warps=num_warps or warps, num_stages=num_stages)  # noqa: E731
    q_rows = q.reshape(rows, head_dim)  # free: row t * heads + h is token t, head h
    start = None if poison is None else jnp.full((rows + st.spare, head_dim), poison, q.dtype)
    out, *partials = _decode_pass(st, call, params(DECODE_WARPS), work, block_tables, q_rows, k_pages, v_pages,
                                  start)
    out = _second_pass(st, call, params(CHUNK_WARPS), work, block_tables, q_rows, k_pages, v_pages, partials, out)
    if st.spare:
        out = out[:rows]
    return out.reshape(num_tokens, num_heads, head_dim)


def _whole(shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _head_pages(k_pages):
    """This KV head's keys of every page: [pages, page_size, head_dim]."""
    return pl.BlockSpec((k_pages.shape[0], k_pages.shape[1], None, k_pages.shape[3]), lambda h, _: (0, 0, h, 0))


def _decode_pass(st: _Static, call, params, work, tables, q_rows, k_pages, v_pages, start):
    entries, head_dim, kv_heads = st.plan.decode_entries, q_rows.shape[1], k_pages.shape[2]
    out_shape = jax.ShapeDtypeStruct((st.rows + st.spare, head_dim), q_rows.dtype)
    part = (entries, kv_heads, DECODE_ROWS)
    inputs = [work, tables, q_rows, k_pages, v_pages] + ([start] if start is not None else [])
    return call(
        functools.partial(_decode_kernel, st=st),
        grid=(kv_heads, entries),
        in_specs=[_whole(work.shape), _whole(tables.shape), _whole(q_rows.shape), _head_pages(k_pages),
                  _head_pages(v_pages)] + ([_whole(start.shape)] if start is not None else []),
        out_specs=[
            _whole(out_shape.shape),
            pl.BlockSpec((None, None, DECODE_ROWS, head_dim), lambda h, e: (e, h, 0, 0)),
            pl.BlockSpec((None, None, DECODE_ROWS), lambda h, e: (e, h, 0)),
            pl.BlockSpec((None, None, DECODE_ROWS), lambda h, e: (e, h, 0)),
        ],
        out_shape=[out_shape, jax.ShapeDtypeStruct((*part, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32), jax.ShapeDtypeStruct(part, jnp.float32)],
        input_output_aliases={5: 0} if start is not None else {},
        compiler_params=params,
        name=f"ragged_paged_attention_decode_g{st.plan.group}_d{head_dim}_k{st.plan.block_keys}",
    )(*inputs)


def _second_pass(st: _Static, call, params, work, tables, q_rows, k_pages, v_pages, partials, out):
    head_dim, kv_heads = q_rows.shape[1], k_pages.shape[2]
    entries = st.plan.decode_entries
    acc_spec = pl.BlockSpec((entries, None, DECODE_ROWS, head_dim), lambda h, _: (0, h, 0, 0))
    stat_spec = pl.BlockSpec((entries, None, DECODE_ROWS), lambda h, _: (0, h, 0))
    return call(
        functools.partial(_second_kernel, st=st),
        grid=(kv_heads, st.plan.chunk_entries + entries),
        in_specs=[_whole(work.shape), _whole(tables.shape), _whole(q_rows.shape), _head_pages(k_pages),
                  _head_pages(v_pages), acc_spec, stat_spec, stat_spec, _whole(out.shape)],
        out_specs=_whole(out.shape),
        out_shape=jax.ShapeDtypeStruct(out.shape, out.dtype),
        input_output_aliases={8: 0},
        compiler_params=params,
        name=f"ragged_paged_attention_chunks_g{st.plan.group}_d{head_dim}_k{st.plan.block_keys}_c{st.plan.chunk_entries}",
    )(work, tables, q_rows, k_pages, v_pages, *partials, out)


def _decode_kernel(work_ref, tables_ref, q_ref, k_ref, v_ref, *refs, st: _Static):
    out_ref, acc_ref, max_ref, sum_ref = refs[-4:]  # (a poisoned start buffer, aliased to out_ref, first)
    h, e = pl.program_id(0), pl.program_id(1)
    token = work_ref[e, Q_FIRST]

    @pl.when(work_ref[e, Q_END] > token)
    def _():
        r = jnp.arange(DECODE_ROWS, dtype=jnp.int32)
        mine = r < st.plan.group
        dest = token * st.heads + h * st.plan.group + r
        q = q_ref[jnp.minimum(dest, st.rows - 1)]
        position = token + work_ref[e, POS_OFFSET]
        acc, row_max, row_sum = _attend(
            st, q, jnp.full((DECODE_ROWS,), position, jnp.int32), position, work_ref[e, SEQ],
            work_ref[e, KEY_START], work_ref[e, KEY_STOP], tables_ref, k_ref, v_ref)
        count = work_ref[e, MERGE_COUNT]

        @pl.when(count == 1)
        def _():
            _store_rows(st, out_ref, dest, mine, acc / jnp.where(row_sum > 0, row_sum, 1.0)[:, None])

        @pl.when(count > 1)
        def _():
            acc_ref[...] = acc
            max_ref[...] = row_max
            sum_ref[...] = row_sum


def _second_kernel(work_ref, tables_ref, q_ref, k_ref, v_ref, acc_ref, max_ref, sum_ref, _, out_ref, *, st: _Static):
    h, i = pl.program_id(0), pl.program_id(1)
    chunks = st.plan.chunk_entries
    if chunks:
        @pl.when(i < chunks)
        def _():
            _chunk_program(st, st.plan.decode_entries + i, h, work_ref, tables_ref, q_ref, k_ref, v_ref, out_ref)

    @pl.when(i >= chunks)
    def _():
        _merge_program(st, i - chunks, h, work_ref, acc_ref, max_ref, sum_ref, out_ref)


def _chunk_program(st: _Static, e, h, work_ref, tables_ref, q_ref, k_ref, v_ref, out_ref):
    first, end, offset = work_ref[e, Q_FIRST], work_ref[e, Q_END], work_ref[e, POS_OFFSET]
    group = st.plan.group

    @pl.when(end > first)
    def _():
        r = jnp.arange(CHUNK_ROWS, dtype=jnp.int32)
        token = first + r // group
        mine = (r < st.plan.block_q * group) & (token < end)
        dest = token * st.heads + h * group + r % group
        q = q_ref[jnp.minimum(dest, st.rows - 1)]
        acc, _, row_sum = _attend(st, q, token + offset, first + offset, work_ref[e, SEQ], work_ref[e, KEY_START],
                                  work_ref[e, KEY_STOP], tables_ref, k_ref, v_ref)
        _store_rows(st, out_ref, dest, mine, acc / jnp.where(row_sum > 0, row_sum, 1.0)[:, None])


def _merge_program(st: _Static, e, h, work_ref, acc_ref, max_ref, sum_ref, out_ref):
    """Combine a split token's partials (max in log2 units; a split that saw no key has sum 0)."""
    count = work_ref[e, MERGE_COUNT]

    @pl.when((count > 1) & (work_ref[e, MERGE_FIRST] == e))
    def _():
        def combine(j, carry):
            acc, top, total = carry
            part_max = max_ref[e + j]
            new_top = jnp.maximum(top, part_max)
            old, new = jnp.exp2(top - new_top), jnp.exp2(part_max - new_top)
            return acc * old[:, None] + acc_ref[e + j] * new[:, None], new_top, total * old + sum_ref[e + j] * new

        init = (jnp.zeros(acc_ref.shape[1:], jnp.float32), jnp.full((DECODE_ROWS,), _NEG, jnp.float32),
                jnp.zeros((DECODE_ROWS,), jnp.float32))
        acc, _, total = jax.lax.fori_loop(0, count, combine, init)
        r = jnp.arange(DECODE_ROWS, dtype=jnp.int32)
        dest = work_ref[e, Q_FIRST] * st.heads + h * st.plan.group + r
        _store_rows(st, out_ref, dest, r < st.plan.group, acc / jnp.where(total > 0, total, 1.0)[:, None])


def _attend(st: _Static, q, q_pos, first_pos, seq, key_start, key_stop, tables_ref, k_ref, v_ref):
    """Online softmax of query rows q [R, D] at positions q_pos [R] (the lowest first_pos) over
    key blocks [key_start, key_stop) of sequence seq: (accumulator, max in log2 units, sum)."""
    plan = st.plan
    block_keys, per_block = plan.block_keys, plan.pages_per_block
    head_dim = k_ref.shape[-1]
    if st.sliding_window is not None:  # blocks wholly before the first query's window are skipped
        window_start = jnp.maximum(first_pos - st.sliding_window + 1, 0) // block_keys
        key_start = jnp.minimum(jnp.maximum(key_start, window_start), key_stop)

    def visit(j, carry):
        acc, row_max, row_sum = carry
        # Columns past the table's end clamp to its last one: those keys lie past every query.
        cols = jnp.minimum(j * per_block + jnp.arange(per_block, dtype=jnp.int32), st.max_blocks - 1)
        pages = tables_ref[seq, cols]
        k = k_ref[pages].reshape(block_keys, head_dim)
        v = v_ref[pages].reshape(block_keys, head_dim)
        scores = _dot(q, k, ((1,), (1,)), st.precision) * st.sm_scale  # q k^T: [rows, keys] float32
        if st.soft_cap is not None:
            scores = st.soft_cap * jnp.tanh(scores / st.soft_cap)
        k_pos = j * block_keys + jnp.arange(block_keys, dtype=jnp.int32)
        visible = k_pos[None, :] <= q_pos[:, None]
        if st.sliding_window is not None:
            visible &= k_pos[None, :] > q_pos[:, None] - st.sliding_window
        scores = jnp.where(visible, scores * _LOG2E, _NEG)
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))
        probs = jnp.where(visible, jnp.exp2(scores - new_max[:, None]), 0.0)
        rescale = jnp.exp2(row_max - new_max)
        acc = acc * rescale[:, None] + _dot(probs.astype(v.dtype), v, ((1,), (0,)), st.precision)
        return acc, new_max, row_sum * rescale + jnp.sum(probs, axis=1)

    rows = q.shape[0]
    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), _NEG, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    return jax.lax.fori_loop(key_start, key_stop, visit, init)


def _store_rows(st: _Static, out_ref, dest, mine, values):
    """values [R, D] into result rows dest [R] where mine [R]."""
    r = jnp.arange(dest.shape[0], dtype=jnp.int32)
    # Masked lanes still need an address: in bounds on the GPU, a spare row of their own when interpreted.
    dest = jnp.where(mine, dest, st.rows + r) if st.spare else jnp.minimum(dest, st.rows - 1)
    cols = jnp.arange(values.shape[1], dtype=jnp.int32)
    plgpu.store(out_ref.at[dest[:, None], cols[None, :]], values.astype(out_ref.dtype),
                mask=jnp.broadcast_to(mine[:, None], values.shape))


def _dot(a, b, contracting, precision):
    # lax.dot_general rather than pl.dot, which jax 0.11 removed; float32 accumulation.
    return jax.lax.dot_general(a, b, (contracting, ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)
