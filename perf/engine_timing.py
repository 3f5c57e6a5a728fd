"""Timing an in-process engine's workload: shared by the CPU and GPU benchmarks."""

from __future__ import annotations

import itertools
import time

_batches = itertools.count()


def step_marks(engine, batch: list[list[int]], params) -> list[float]:
    """Submit every prompt of `batch`, step until idle, and return the seconds from submission
    to each step that produced tokens (marks[0] is the first token's time)."""
    tag = next(_batches)
    for i, ids in enumerate(batch):
        engine.add_request(ids, params, request_id=f"bench-{tag}-{i}")
    t0, marks = time.perf_counter(), []
    while engine.has_unfinished():
        if engine.step():
            marks.append(time.perf_counter() - t0)
    return marks
