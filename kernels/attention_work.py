"""The Pallas attention kernel's work table: what each of its programs does in one step.

The table depends only on the batch (each sequence's query span and context length), not on
the layer, so the runner builds it once per step on the host (numpy), sends it inside the
step's packed input buffer, and every layer's kernel reads the same table. Called without a
table, the kernel builds it in XLA from the same function (`xp=jax.numpy`).

Two kinds of entry, in one int32 array of `WORK_COLS` columns:
- decode entries (the first `plan.decode_entries` rows): one query token's run of key
  blocks. A sequence with one new token gets up to `MAX_SPLITS` entries, each a share of its
  context, when the step has few such tokens (so the GPU's multiprocessors all have work);
  its `merge_count` entries are then combined by the kernel's second pass.
- chunk entries (the rest): up to `plan.block_q` consecutive query tokens of one sequence
  with more than one new token, against all their keys; and the padding tokens past the
  last sequence, in runs of `block_q`, which see no key and get zeros.
Rows past the step's real entries have an empty query span and read nothing.

Columns: seq, first query token, end query token, position offset (token t sits at position
t + offset), first and end key block, merge first (the token's first decode entry), merge
count (how many entries share the token; 1 = the entry writes its rows itself).
"""

from __future__ import annotations

import dataclasses

import numpy as np

WORK_COLS = 8
SEQ, Q_FIRST, Q_END, POS_OFFSET, KEY_START, KEY_STOP, MERGE_FIRST, MERGE_COUNT = range(WORK_COLS)

DECODE_ROWS = 16  # a decode program: one token's query heads of one KV head, padded to a tensor-core tile
CHUNK_ROWS = 64  # a chunk program: block_q tokens x group heads, so a chunk's queries share each page read
MAX_SPLITS = 16
# Decode entries there is room for, at least: with 8 KV heads 512 decode programs, ~4 per
# multiprocessor of an H100/H200, enough to split a lone sequence's context 16 ways.
MIN_DECODE_ENTRIES = 64
MAX_BLOCK_KEYS = 128
BLOCK_BYTES = 32 * 1024  # one K (or V) block in shared memory: 128 keys of bf16 x 128


@dataclasses.dataclass(frozen=True)
class WorkPlan:
    """Static shape of a step's work: fixed per (tokens, seqs) bucket, so hashable and jit-static."""

    tokens: int
    seqs: int
    group: int  # query heads per KV head
    block_keys: int  # keys per inner step of a program
    page_size: int
    decode_entries: int
    chunk_entries: int  # 0: no chunk pass (every token is a decode or padding)

    @property
    def block_q(self) -> int:
        """Whole tokens per chunk program; the rows past block_q * group idle."""
        return CHUNK_ROWS // self.group

    @property
    def pages_per_block(self) -> int:
        return self.block_keys // self.page_size

    @property
    def rows(self) -> int:
        return self.decode_entries + self.chunk_entries


def block_keys_for(head_dim: int, page_size: int, itemsize: int) -> int:
    """128-key blocks where a block of K fits in 32 KiB (bf16 up to head_dim 128), else fewer;
    never less than one page."""
    return max(page_size, min(MAX_BLOCK_KEYS, BLOCK_BYTES // (head_dim * itemsize)))


def work_plan(tokens: int, seqs: int, group: int, head_dim: int, page_size: int, dtype, *,
              decode_only: bool = False) -> WorkPlan:
    """`decode_only`: the caller promises every sequence brings at most one token, so the chunk
    pass is left out (a one-token step always is)."""
    block_keys = block_keys_for(head_dim, page_size, np.dtype(dtype).itemsize)
    if decode_only or tokens == 1:
        # Padding tokens take decode entries too (no keys, zeros out): room for every token.
        return WorkPlan(tokens, seqs, group, block_keys, page_size, max(tokens, MIN_DECODE_ENTRIES), 0)
    block_q = CHUNK_ROWS // group
    # sum over chunks of ceil(q_len / block_q), plus ceil(padding / block_q), is below this
    chunk_entries = min(seqs, tokens // 2) + -(-tokens // block_q) + 1
    return WorkPlan(tokens, seqs, group, block_keys, page_size, max(min(seqs, tokens), MIN_DECODE_ENTRIES),
                    chunk_entries)


def work_table(plan: WorkPlan, query_start_loc, context_lens, xp=np):
    """[plan.rows, WORK_COLS] int32. `xp` is numpy on the host (the runner) or jax.numpy when
    the kernel builds its own table inside a traced function."""
    qsl = xp.asarray(query_start_loc).astype(xp.int32)
    ctx = xp.asarray(context_lens).astype(xp.int32)
    decode = _decode_entries(plan, qsl, ctx, xp)
    if not plan.chunk_entries:
        return decode
    return xp.concatenate([decode, _chunk_entries(plan, qsl, ctx, xp)]).astype(xp.int32)


def _expand(counts, num_entries: int, xp):
    """Entry e belongs to unit owner[e], as its index-th of counts[owner]; real[e] says whether
    e is one of the sum(counts) real entries."""
    ends = xp.cumsum(counts)
    e = xp.arange(num_entries)
    owner = xp.minimum(xp.searchsorted(ends, e, side="right"), counts.shape[0] - 1)
    return owner, e - (ends - counts)[owner], e < ends[-1], ends - counts


def _cdiv(a, b):
    return (a + b - 1) // b


def _decode_entries(plan: WorkPlan, qsl, ctx, xp):
    """Units: the sequences, then (without a chunk pass) one per token, live when it is padding."""
    num_seqs = ctx.shape[0]
    q_len = qsl[1:] - qsl[:-1]
    token = qsl[:-1]
    live = q_len == 1
    seq = xp.arange(num_seqs)
    if not plan.chunk_entries:
        t = xp.arange(plan.tokens)
        token = xp.concatenate([token, t])
        live = xp.concatenate([live, t >= qsl[num_seqs]])
        ctx = xp.concatenate([ctx, xp.zeros(plan.tokens, xp.int32)])
        seq = xp.concatenate([seq, xp.zeros(plan.tokens, seq.dtype)])
    num_blocks = _cdiv(xp.where(live, ctx, 0), plan.block_keys)
    num_decodes = xp.sum(live & (ctx > 0))
    num_padding = xp.sum(live) - num_decodes
    room = (plan.decode_entries - num_padding) // xp.maximum(num_decodes, 1)
    per_decode = xp.maximum(xp.minimum(room, MAX_SPLITS), 1)
    splits = xp.where(live, xp.maximum(xp.minimum(per_decode, num_blocks), 1), 0)
    owner, index, real, first = _expand(splits, plan.decode_entries, xp)
    n, blocks = splits[owner], num_blocks[owner]
    share = _cdiv(blocks, xp.maximum(n, 1))
    key_start = xp.minimum(index * share, blocks)
    key_stop = xp.minimum(key_start + share, blocks)
    tok = token[owner]
    cols = [seq[owner], tok, tok + 1, ctx[owner] - 1 - tok, key_start, key_stop, first[owner], n]
    return xp.where(real[:, None], xp.stack(cols, axis=1), 0).astype(xp.int32)


def _chunk_entries(plan: WorkPlan, qsl, ctx, xp):
    """Units: the sequences with more than one new token, then the padding tokens as one more."""
    num_seqs = ctx.shape[0]
    bq = plan.block_q
    unit_first = qsl
    unit_end = xp.concatenate([qsl[1:], xp.full((1,), plan.tokens, xp.int32)])
    unit_ctx = xp.concatenate([ctx, xp.zeros((1,), xp.int32)])
    q_len = unit_end - unit_first
    items = xp.where((q_len > 1) | (xp.arange(num_seqs + 1) == num_seqs), _cdiv(q_len, bq), 0)
    owner, index, real, _ = _expand(items, plan.chunk_entries, xp)
    first = unit_first[owner] + index * bq
    end = xp.minimum(first + bq, unit_end[owner])
    offset = unit_ctx[owner] - unit_end[owner]
    key_stop = _cdiv(xp.maximum(xp.minimum(unit_ctx[owner], end + offset), 0), plan.block_keys)
    zero = xp.zeros_like(first)
    cols = [xp.minimum(owner, num_seqs - 1), first, end, offset, zero, key_stop, zero, zero]
    return xp.where(real[:, None], xp.stack(cols, axis=1), 0).astype(xp.int32)
