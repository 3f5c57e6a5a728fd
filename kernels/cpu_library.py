"""The C++ CPU kernels of `kernels/cpu/`: one shared library, built on first use.

Compiled with the machine's C++ compiler (`-march=native`, so it is built per machine and
each kernel takes the widest path the CPU has: AMX, AVX-512 BF16, AVX-512 or AVX2) against
the XLA FFI headers that jaxlib ships, and kept in
`$XDG_CACHE_HOME/tessera/kernels/<hash of sources, flags, jaxlib and CPU>/`. `available()`
says whether it built; callers fall back to XLA's own operations when it did not, and the
log says so in one line. `TESSERA_CPU_ARCH` replaces `-march=native` (e.g. `x86-64-v3`, or
`x86-64-v4 -mavx512bf16`), for a build that must run on older CPUs than the one it is built
on; `compile_sources` compiles for any such target without loading the result (the tests
compile every target so no kernel branch goes unbuilt).
"""

from __future__ import annotations

import concurrent.futures
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
    "tessera_packed_linear": "TesseraPackedLinear",
    "tessera_logits_summary": "TesseraLogitsSummary",
    "tessera_linear_qkv_rope": "TesseraLinearQkvRope",
    "tessera_packed_qkv_rope": "TesseraPackedQkvRope",
}
# -ffast-math lets GCC call glibc's vectorised expf; the kernels mask with a finite sentinel,
# never infinities, so finite-math assumptions hold. It is given to the compile step only:
# linking with it adds crtfastmath.o, which on load would flush subnormals to zero for the
# whole process.
CXX_FLAGS = ("-O3", "-ffast-math", "-std=c++17", "-fPIC")
LINK_FLAGS = ("-shared",)
ARCH_ENV_VAR = "TESSERA_CPU_ARCH"


class KernelBuildError(RuntimeError):
    """The CPU kernel library could not be compiled or loaded: args are a one-line summary,
    then (for a compiler error) the compiler's output."""


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


def arch_flags(arch: str | None = None) -> tuple[str, ...]:
    """-march (and any -m flags) for a target: `arch`, else TESSERA_CPU_ARCH, else native."""
    words = (arch or os.environ.get(ARCH_ENV_VAR) or "native").split()
    return (f"-march={words[0]}", *words[1:])


def library_path() -> Path:
    digest = hashlib.sha256()
    for path in (*_sources(), *sorted(SOURCE_DIR.glob("*.h"))):
        digest.update(path.name.encode() + path.read_bytes())
    for part in (" ".join((*CXX_FLAGS, *arch_flags(), *LINK_FLAGS)), jaxlib.__version__, _cpu_signature()):
        digest.update(part.encode())
    return _cache_dir() / digest.hexdigest()[:16] / "libtessera_cpu_kernels.so"


def build() -> Path:
    """Compile the library unless these sources, flags, jaxlib and CPU already have it."""
    target = library_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed: concurrent processes never load a half-written file.
    work = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        link(compile_sources(work, jobs=os.cpu_count() or 1), target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def link(objects: list[Path], target: Path) -> None:
    """The shared library from `objects`, written beside `target` and renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".{os.getpid()}.partial")
    _run([_compiler(), *LINK_FLAGS, *map(str, objects), "-o", str(partial)])
    os.replace(partial, target)


def compile_sources(out_dir: Path, arch: str | None = None, jobs: int = 1, flags: tuple[str, ...] = CXX_FLAGS) -> list[Path]:
    """Every source compiled to an object in `out_dir` for `arch` (see `arch_flags`), `jobs`
    compilers at a time; KernelBuildError naming the first source that fails."""
    compiler, include = _compiler(), f"-I{jax.ffi.include_dir()}"
    commands = [
        [compiler, *flags, *arch_flags(arch), include, "-c", str(source), "-o", str(out_dir / f"{source.stem}.o")]
        for source in _sources()
    ]
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(_run, commands))
    return [Path(cmd[-1]) for cmd in commands]


def _compiler() -> str:
    wanted = os.environ.get("CXX")
    compiler = shutil.which(wanted) if wanted else shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise KernelBuildError(f"no C++ compiler {wanted!r} found (install g++, or set CXX)" if wanted
                               else "no C++ compiler found (install g++, or set CXX)")
    return compiler


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        what = Path(cmd[cmd.index("-c") + 1]).name if "-c" in cmd else "linking"
        lines = done.stderr.strip().splitlines()
        first = next((line for line in lines if "error" in line), lines[-1] if lines else "no message")
        raise KernelBuildError(f"{what} failed to compile: {first.strip()}", done.stderr[-4000:])


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
        summary = e.args[0] if e.args else repr(e)
        log.warning("CPU kernels unavailable (%s): XLA's own operations and the jnp reference attention run "
                    "instead, slower; tessera:backend_mode shows backend=\"cpu_xla\"", summary)
        if len(e.args) > 1:
            log.debug("CPU kernel build output:\n%s", e.args[1])
        return False
    return True
