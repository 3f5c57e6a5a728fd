"""A persistent XLA compilation cache, so restarts and reloads skip recompiling the buckets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jax

DEFAULT_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tessera" / "xla"
MIN_COMPILE_SECONDS = 1.0  # while serving: a program compiled at run time is kept if it took this long


def enable_compilation_cache(directory: str | Path | None = None) -> Path:
    """Point jax at an on-disk cache of compiled programs; programs that took over a second
    to compile are kept (and, within `keep_every_program`, all). Returns the directory used."""
    path = Path(directory or os.environ.get("TESSERA_COMPILATION_CACHE_DIR") or DEFAULT_DIR)
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path


@contextmanager
def keep_every_program() -> Iterator[None]:
    """Within: every program compiled is written to the persistent cache, however fast.

    For building and warming an engine. Each of those programs is compiled on every start
    before /ready, and many compile in under the second the cache otherwise asks for (the
    KV tiers' page gathers and scatters take ~0.5 s each on the 2-core CPU; the weight
    layout's reshapes and the step's input staging a few tens of ms): loading them back is
    cheaper. Whether one crossed the second used to depend on the machine's load, so a
    restart was fast or slow by chance. Their number is fixed by the model and settings,
    so the cache does not grow with traffic. The setting is process-wide: a program another
    thread compiles meanwhile (an old engine during a reload) is kept too, which is harmless.
    """
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        yield
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)
