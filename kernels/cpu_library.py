"""The C++ CPU kernels of `kernels/cpu/`: one shared library, built on first use.

Compiled with the machine's C++ compiler (`-march=native`, so it is built per machine)
against the XLA FFI headers that jaxlib ships, and kept in
`$XDG_CACHE_HOME/tessera/kernels/<hash of sources, flags, jaxlib and CPU>/`. `available()`
says whether it built; callers fall back to XLA's own operations when it did not.
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
import jaxlib

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).with_name("cpu")
# FFI target name -> the handler symbol the library exports.
HANDLERS = {
    "tessera_ragged_paged_attention": "TesseraRaggedPagedAttention",
    "tessera_linear": "TesseraLinear",
    "tessera_paged_kv_write": "TesseraPagedKVWrite",
    "tessera_amx_linear": "TesseraAmxLinear",
    "tessera_logits_summary": "TesseraLogitsSummary",
    "tessera_linear_qkv_rope": "TesseraLinearQkvRope",
    "tessera_amx_qkv_rope": "TesseraAmxQkvRope",
}
# -ffast-math lets GCC call glibc's vectorised expf; the kernels mask with a finite sentinel,
# never infinities, so finite-math assumptions hold. It is given to the compile step only:
# linking with it adds crtfastmath.o, which on load would flush subnormals to zero for the
# whole process.
CXX_FLAGS = ("-O3", "-march=native", "-ffast-math", "-std=c++17", "-fPIC")
LINK_FLAGS = ("-shared",)


class KernelBuildError(RuntimeError):
    """The CPU kernel library could not be compiled or loaded."""


def _sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.cc"))


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
    for path in (*_sources(), *sorted(SOURCE_DIR.glob("*.h"))):
        digest.update(path.name.encode() + path.read_bytes())
    for part in (" ".join((*CXX_FLAGS, *LINK_FLAGS)), jaxlib.__version__, _cpu_signature()):
        digest.update(part.encode())
    return _cache_dir() / digest.hexdigest()[:16] / "libtessera_cpu_kernels.so"


def build() -> Path:
    """Compile the library unless these sources, flags, jaxlib and CPU already have it."""
    target = library_path()
    if target.exists():
        return target
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise KernelBuildError("no C++ compiler found (install g++, or set CXX)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed: concurrent processes never load a half-written file.
    work = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        objects = []
        for source in _sources():
            objects.append(work / f"{source.stem}.o")
            _run([compiler, *CXX_FLAGS, f"-I{jax.ffi.include_dir()}", "-c", str(source), "-o", str(objects[-1])])
        _run([compiler, *LINK_FLAGS, *map(str, objects), "-o", str(work / target.name)])
        os.replace(work / target.name, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise KernelBuildError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")


@functools.cache
def library() -> ctypes.CDLL:
    """The loaded library, built first if need be."""
    return ctypes.cdll.LoadLibrary(str(build()))


@functools.cache
def register() -> None:
    """Build (if need be), load, and register every handler with jax for the CPU platform."""
    for target, symbol in HANDLERS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library(), symbol)), platform="cpu")


@functools.cache
def available() -> bool:
    """True when the library is built (building it now if need be) and registered with jax."""
    try:
        register()
    except (KernelBuildError, OSError, AttributeError, subprocess.SubprocessError) as e:
        log.warning("CPU kernels unavailable, XLA's own operations will run instead: %s", e)
        return False
    return True
