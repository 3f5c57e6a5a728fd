"""A persistent XLA compilation cache, so restarts and reloads skip recompiling the buckets."""

from __future__ import annotations

import os
from pathlib import Path

import jax

DEFAULT_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tessera" / "xla"


def enable_compilation_cache(directory: str | Path | None = None) -> Path:
    """Point jax at an on-disk cache of compiled programs; programs that took over a second
    to compile are kept. Returns the directory used."""
    path = Path(directory or os.environ.get("TESSERA_COMPILATION_CACHE_DIR") or DEFAULT_DIR)
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path
