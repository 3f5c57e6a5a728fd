"""A step's host inputs in one preallocated buffer, sent to the device in one transfer.

Every per-step array (tokens, positions, cache slots, block tables, sampling values...) is a
slice of one flat int32 buffer; float32 and uint32 fields are stored bit for bit and viewed
back inside the jitted step, so a step costs one host-to-device copy, not fourteen.

Shape of the buffer for a bucket of T tokens and S sequence rows (B pages per sequence):

    tokens[T] positions[T] slots[T] from_previous[T] lora_slots[T] | block_tables[S*B] context_lens[S]
    query_start[S+1] logits_indices[S] | temperature[S] top_p[S] top_k[S] min_p[S] seeds[S]
    sample_positions[S] | attention_work[E*8]

The last field is the Pallas attention kernel's work table (`kernels/attention_work.py`),
present only when the layout carries its plan: built here once per step, read by every layer.

Two buffers per bucket, used in turn: with overlapped scheduling the next step is written
while the previous one may still read its own (on CPU jax may alias a numpy argument instead
of copying it), and a step's buffer is only reused once the step after it was dispatched and
the one before it read back.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from kernels.attention_work import WORK_COLS, WorkPlan

NOT_ON_DEVICE = -1  # from_previous: this token is on the host (its value is in `tokens`)

_FIELDS = (  # name, dtype, length in units of (tokens, rows, rows * pages, 1)
    ("tokens", np.int32, (1, 0, 0, 0)),
    ("positions", np.int32, (1, 0, 0, 0)),
    ("slots", np.int32, (1, 0, 0, 0)),
    ("from_previous", np.int32, (1, 0, 0, 0)),
    ("lora_slots", np.int32, (1, 0, 0, 0)),
    ("block_tables", np.int32, (0, 0, 1, 0)),
    ("context_lens", np.int32, (0, 1, 0, 0)),
    ("query_start", np.int32, (0, 1, 0, 1)),
    ("logits_indices", np.int32, (0, 1, 0, 0)),
    ("temperature", np.float32, (0, 1, 0, 0)),
    ("top_p", np.float32, (0, 1, 0, 0)),
    ("top_k", np.int32, (0, 1, 0, 0)),
    ("min_p", np.float32, (0, 1, 0, 0)),
    ("seeds", np.uint32, (0, 1, 0, 0)),
    ("sample_positions", np.int32, (0, 1, 0, 0)),
)


@dataclasses.dataclass(frozen=True)
class StepLayout:
    """Where each field sits in the flat buffer of one bucket. Hashable: a static jit argument."""

    tokens: int
    rows: int
    pages_per_row: int
    attention: WorkPlan | None = None  # the attention kernel's plan for this bucket, when it takes a work table

    def spans(self) -> dict[str, tuple[int, int, np.dtype]]:
        """name -> (offset, length, dtype), in buffer order."""
        out, at = {}, 0
        for name, dtype, (per_token, per_row, per_page, extra) in _FIELDS:
            n = per_token * self.tokens + per_row * self.rows + per_page * self.rows * self.pages_per_row + extra
            out[name] = (at, n, np.dtype(dtype))
            at += n
        if self.attention is not None:
            out["attention_work"] = (at, self.attention.rows * WORK_COLS, np.dtype(np.int32))
        return out

    @property
    def size(self) -> int:
        return sum(n for _, n, _ in self.spans().values())

    def unpack(self, packed: Int[Array, " size"]) -> dict[str, jax.Array]:
        """The fields as device arrays, inside the jitted step (static slices, free bitcasts)."""
        fields = {}
        for name, (at, n, dtype) in self.spans().items():
            part = jax.lax.slice_in_dim(packed, at, at + n)
            if dtype != np.int32:
                part = jax.lax.bitcast_convert_type(part, jnp.dtype(dtype))
            fields[name] = part
        fields["block_tables"] = fields["block_tables"].reshape(self.rows, self.pages_per_row)
        work = fields.get("attention_work")
        fields["attention_work"] = None if work is None else work.reshape(-1, WORK_COLS)
        return fields


class HostStepBuffers:
    """Preallocated host buffers of one bucket, two in turn, with numpy views per field."""

    def __init__(self, layout: StepLayout):
        self.layout = layout
        self._buffers = [np.zeros(layout.size, np.int32) for _ in range(2)]
        self._views = [self._view(b) for b in self._buffers]
        self._turn = 0

    def _view(self, buffer: np.ndarray) -> dict[str, np.ndarray]:
        views = {}
        for name, (at, n, dtype) in self.layout.spans().items():
            views[name] = buffer[at : at + n].view(dtype)
        views["block_tables"] = views["block_tables"].reshape(self.layout.rows, self.layout.pages_per_row)
        if "attention_work" in views:
            views["attention_work"] = views["attention_work"].reshape(-1, WORK_COLS)
        return views

    def next(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The buffer to fill for the next step (reset to the padding values) and its views."""
        self._turn ^= 1
        buffer, views = self._buffers[self._turn], self._views[self._turn]
        buffer.fill(0)
        views["slots"].fill(-1)  # padding tokens write nowhere
        views["from_previous"].fill(NOT_ON_DEVICE)
        views["top_p"].fill(1.0)
        return buffer, views
