"""Ragged paged attention on CPUs: the C++ custom call in `kernels/cpu/`, built on first use.

Same arguments and results as `ragged_paged_attention_ref` (the jnp reference). The
reference is a loop of small XLA ops per layer whose runtime overhead dominates decode
steps on a CPU; this is one call per layer, threaded over (sequence, KV head, query run).

The shared library is compiled with the machine's C++ compiler (`-march=native`, so it is
built per machine) against the XLA FFI headers that jaxlib ships, and kept in
`$XDG_CACHE_HOME/tessera/kernels/<hash of source, flags, jaxlib and CPU>/`. `available()`
says whether it built; the runtime falls back to the reference when it did not.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jaxtyping import Array, Float, Int

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu") / "ragged_paged_attention.cc"
TARGET = "tessera_ragged_paged_attention"
SYMBOL = "TesseraRaggedPagedAttention"
# -ffast-math lets GCC call glibc's vectorised expf; the kernel masks with a finite
# sentinel, never infinities, so finite-math assumptions hold. It is given to the compile
# step only: linking with it adds crtfastmath.o, which on load would flush subnormals to
# zero for the whole process.
CXX_FLAGS = ("-O3", "-march=native", "-ffast-math", "-std=c++17", "-fPIC")
LINK_FLAGS = ("-shared",)


class KernelBuildError(RuntimeError):
    """The CPU attention library could not be compiled or loaded."""


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("TESSERA_KERNEL_CACHE_DIR") or root / "tessera" / "kernels")


def library_path() -> Path:
    digest = hashlib.sha256()
    flags = " ".join((*CXX_FLAGS, *LINK_FLAGS)).encode()
    for part in (SOURCE.read_bytes(), flags, jaxlib.__version__.encode(), _cpu_signature().encode()):
        digest.update(part)
    return _cache_dir() / digest.hexdigest()[:16] / "libtessera_cpu_attention.so"


def build() -> Path:
    """Compile the library unless this source, compiler flags, jaxlib and CPU already have it."""
    target = library_path()
    if target.exists():
        return target
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise KernelBuildError("no C++ compiler found (install g++, or set CXX)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a half-written file.
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    objects = partial.with_suffix(".o")
    compile_cmd = [compiler, *CXX_FLAGS, f"-I{jax.ffi.include_dir()}", "-c", str(SOURCE), "-o", str(objects)]
    link_cmd = [compiler, *LINK_FLAGS, str(objects), "-o", str(partial)]
    try:
        for cmd in (compile_cmd, link_cmd):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise KernelBuildError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
        objects.unlink(missing_ok=True)
    return target


@functools.cache
def _register() -> None:
    library = ctypes.cdll.LoadLibrary(str(build()))
    handler = getattr(library, SYMBOL)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")


def available() -> bool:
    """True when the library is built (building it now if need be) and registered with jax."""
    try:
        _register()
    except (KernelBuildError, OSError, AttributeError, subprocess.SubprocessError) as e:
        log.warning("CPU attention kernel unavailable, the jnp reference will attend: %s", e)
        return False
    return True


def ragged_paged_attention_cpu(
    q: Float[Array, "tokens heads head_dim"],
    k_pages: Float[Array, "pages page_size kv_heads head_dim"],
    v_pages: Float[Array, "pages page_size kv_heads head_dim"],
    block_tables: Int[Array, "seqs max_blocks"],
    context_lens: Int[Array, " seqs"],
    query_start_loc: Int[Array, " seqs_plus_one"],
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> Float[Array, "tokens heads head_dim"]:
    _register()
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages {k_pages.dtype} and v_pages {v_pages.dtype} must share a dtype")
    for name, a in (("q", q), ("k_pages", k_pages)):
        if a.dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"{name} must be float32 or bfloat16, got {a.dtype}")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential")
    as_i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    return call(
        q, k_pages, v_pages, as_i32(block_tables), as_i32(context_lens), as_i32(query_start_loc),
        sm_scale=np.float32(sm_scale), sliding_window=np.int32(sliding_window or 0),
        soft_cap=np.float32(soft_cap or 0.0),
    )
