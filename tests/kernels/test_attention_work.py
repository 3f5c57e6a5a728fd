"""The attention kernel's work table (kernels/attention_work.py): exact rows for small steps,
host (numpy) and XLA builds identical, every token covered exactly once, capacity never
exceeded."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention_work import (
    MAX_SPLITS, MERGE_COUNT, MERGE_FIRST, Q_END, Q_FIRST, block_keys_for, work_plan, work_table,
)


def _qsl(q_lens):
    return np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)


@pytest.mark.parametrize("dtype, head_dim, page, keys", [
    (jnp.bfloat16, 128, 16, 128), (jnp.bfloat16, 64, 16, 128), (jnp.float32, 128, 16, 64),
    (jnp.float32, 64, 8, 128), (jnp.float32, 128, 128, 128), (jnp.bfloat16, 128, 256, 256),
])
def test_block_keys_are_128_where_a_block_fits_32_kib(dtype, head_dim, page, keys):
    assert block_keys_for(head_dim, page, jnp.dtype(dtype).itemsize) == keys


def test_mixed_step_rows():
    # Tokens: decode (ctx 70, split in two 64-key blocks), decode (ctx 1), empty slot, a 3-token
    # chunk at positions 13-15, then 2 padding tokens; group 4 -> 16 tokens per chunk entry.
    plan = work_plan(8, 4, 4, 128, 16, jnp.float32)
    assert (plan.block_keys, plan.block_q, plan.decode_entries, plan.chunk_entries) == (64, 16, 64, 6)
    table = work_table(plan, _qsl([1, 1, 0, 3]), [70, 1, 0, 16])
    assert table.shape == (70, 8) and table.dtype == np.int32
    np.testing.assert_array_equal(table[:4], [
        # seq, q first, q end, position offset, key blocks [start, stop), merge first, merge count
        [0, 0, 1, 69, 0, 1, 0, 2],
        [0, 0, 1, 69, 1, 2, 0, 2],
        [1, 1, 2, -1, 0, 1, 2, 1],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ])
    np.testing.assert_array_equal(table[64:67], [
        [3, 2, 5, 11, 0, 1, 0, 0],  # the chunk: token 2 is position 13
        [3, 5, 8, -8, 0, 0, 0, 0],  # padding tokens 5-7, a unit past the last sequence: no keys
        [0, 0, 0, 0, 0, 0, 0, 0],
    ])
    assert not table[4:64].any() and not table[66:].any()


def test_one_token_step_has_no_chunk_entries_and_zeroes_padding_itself():
    plan = work_plan(1, 1, 8, 128, 16, jnp.bfloat16)
    assert plan.chunk_entries == 0 and plan.rows == 64
    np.testing.assert_array_equal(work_table(plan, [0, 0], [0])[0], [0, 0, 1, -1, 0, 0, 0, 1])
    lone = work_table(plan, [0, 1], [2048])  # 16 blocks of 128 keys: 16 entries of one block each
    np.testing.assert_array_equal(lone[:16, 4], np.arange(16))
    np.testing.assert_array_equal(lone[:16, MERGE_COUNT], 16)
    assert not lone[16:].any()


@pytest.mark.parametrize("decodes, splits", [(1, 16), (8, 8), (20, 3), (64, 1)])
def test_decode_splits_fill_the_entries(decodes, splits):
    plan = work_plan(64, 64, 4, 128, 16, jnp.bfloat16)
    table = work_table(plan, _qsl([1] * decodes + [0] * (64 - decodes)), [4096] * decodes + [0] * (64 - decodes))
    decode = table[: plan.decode_entries]
    np.testing.assert_array_equal(decode[: decodes * splits, MERGE_COUNT], splits)
    assert splits <= MAX_SPLITS and not decode[decodes * splits:].any()
    # the 32 key blocks of each context, shared out in order
    first = decode[:splits]
    assert first[0, 4] == 0 and first[-1, 5] == 32 and np.all(first[1:, 4] == first[:-1, 5])


def _coverage(plan, table, tokens):
    """How many times each token is written: by an unsplit decode entry, by a split token's
    merge (once, from its first entry), or by a chunk entry."""
    hits = np.zeros(tokens, int)
    for e, row in enumerate(table):
        chunk = e >= plan.decode_entries
        if row[Q_END] > row[Q_FIRST] and (chunk or row[MERGE_COUNT] == 1 or row[MERGE_FIRST] == e):
            hits[row[Q_FIRST] : row[Q_END]] += 1
    return hits


@pytest.mark.parametrize("tokens, seqs, group, decode_only", [
    (64, 64, 4, False), (64, 16, 3, False), (512, 64, 8, False), (2048, 256, 4, False), (32, 32, 1, True),
])
def test_every_token_is_written_once_and_the_table_fits(tokens, seqs, group, decode_only):
    plan = work_plan(tokens, seqs, group, 128, 16, jnp.bfloat16, decode_only=decode_only)
    rng = np.random.default_rng(tokens + seqs + group)
    for trial in range(40):
        if decode_only:
            q_lens = rng.integers(0, 2, size=seqs)
        else:  # a mix of decodes, chunks of every size up to the budget, empty slots
            q_lens = np.where(rng.random(seqs) < 0.5, 1, rng.integers(0, tokens // 4 + 2, size=seqs))
            while q_lens.sum() > tokens:
                q_lens[rng.integers(seqs)] //= 2
        ctx = q_lens + rng.integers(0, 3000, size=seqs) * (q_lens > 0)
        table = work_table(plan, _qsl(q_lens), ctx)
        np.testing.assert_array_equal(_coverage(plan, table, tokens), 1)
        # the last real decode entry and the last real chunk entry sit inside the table
        assert table.shape == (plan.rows, 8)
        np.testing.assert_array_equal(np.asarray(work_table(plan, jnp.asarray(_qsl(q_lens)), jnp.asarray(ctx),
                                                            xp=jnp)), table)


@pytest.mark.parametrize("q_lens", [[17] * 120, [2] * 256])
def test_capacity_at_the_worst_batches(q_lens):
    # Chunks one token longer than a chunk entry holds (two entries each), or 256 two-token
    # chunks (one each) followed by 1,536 padding tokens: both inside the plan's bound.
    plan = work_plan(2048, 256, 4, 128, 16, jnp.bfloat16)
    table = work_table(plan, _qsl(q_lens), q_lens)
    np.testing.assert_array_equal(_coverage(plan, table, 2048), 1)
    used = int((table[plan.decode_entries:, Q_END] > table[plan.decode_entries:, Q_FIRST]).sum())
    assert used == {17: 241, 2: 352}[q_lens[0]] <= plan.chunk_entries == 385
