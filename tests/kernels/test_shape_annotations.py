"""The jaxtyping annotations are enforced in the tests (pytest runs with the import hook)."""

import jax.numpy as jnp
import pytest
from jaxtyping import TypeCheckError

from kernels.paged_kv_write import write_kv_pages_ref


def test_mismatched_kv_heads_are_caught_before_xla_broadcasts_them():
    pages = jnp.zeros((3, 4, 2, 8))  # 2 KV heads
    one_head = jnp.ones((5, 1, 8))  # a scatter would silently broadcast this to 2 heads
    with pytest.raises(TypeCheckError, match="kv_heads"):
        write_kv_pages_ref(pages, pages, one_head, one_head, jnp.arange(5, dtype=jnp.int32))
