"""Count XLA compilations, to prove steady-state serving never compiles."""

from __future__ import annotations

import contextlib

import jax

_count = 0


def _on_event(event: str, duration: float, **_) -> None:
    global _count
    if event == "/jax/core/compile/backend_compile_duration":
        _count += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


@contextlib.contextmanager
def count_compiles():
    """with count_compiles() as n: ...  then n() is the number of compiles inside the block."""
    start = _count
    final: list[int] = []
    yield lambda: (final[0] if final else _count) - start
    final.append(_count)
