"""The packed step buffer: the attention kernel's work table rides at its end."""

import jax.numpy as jnp
import numpy as np

from kernels.attention_work import work_plan, work_table
from runtime.step_inputs import HostStepBuffers, StepLayout


def test_the_work_table_is_the_last_field_and_unpacks_to_its_rows():
    plan = work_plan(16, 4, 4, 128, 16, jnp.bfloat16)
    plain, with_table = StepLayout(16, 4, 8), StepLayout(16, 4, 8, plan)
    assert "attention_work" not in plain.spans() and plain.unpack(jnp.zeros(plain.size, jnp.int32))[
        "attention_work"] is None
    at, length, dtype = with_table.spans()["attention_work"]
    assert (at, length, dtype) == (plain.size, plan.rows * 8, np.dtype(np.int32))
    assert with_table.size == plain.size + plan.rows * 8

    buffers = HostStepBuffers(with_table)
    packed, views = buffers.next()
    views["query_start"][:] = [0, 1, 4, 4, 4]
    views["context_lens"][:] = [30, 9, 0, 0]
    table = work_table(plan, views["query_start"], views["context_lens"])
    views["attention_work"][...] = table
    np.testing.assert_array_equal(packed[at:].reshape(-1, 8), table)
    np.testing.assert_array_equal(np.asarray(with_table.unpack(jnp.asarray(packed))["attention_work"]), table)
