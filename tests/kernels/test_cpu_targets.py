"""The C++ kernels build for every x86-64 level a user may have, and compute the right answers
on each level this CPU can run.

Each source is compiled (to an object: syntax and code generation) for each target, whether
or not this machine can run the result, so a branch that only another CPU takes cannot break
unseen. Targets this CPU can run are then linked, loaded in a fresh process and checked
against numpy (tests/kernels/kernel_paths_check.py); the others are skipped with the reason.
The library the other tests load is `-march=native`, this CPU's widest paths.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import cpu_library
from kernels.packed_linear import cpu_paths

ROOT = Path(__file__).resolve().parents[2]

V3 = {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"}
V4 = V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
# target (TESSERA_CPU_ARCH) -> the /proc/cpuinfo flags a CPU needs to run its build, and what
# the widening path's register holds (floats).
TARGETS = {
    "x86-64": (set(), 4),  # SSE2 only: the baseline every x86-64 has
    "x86-64-v3": (V3, 8),  # AVX2 (AMD Zen 1-3, Intel Haswell on)
    "x86-64-v4": (V4, 16),  # AVX-512 without BF16 (Intel Skylake-SP, Ice Lake)
    "x86-64-v4 -mavx512bf16": (V4 | {"avx512_bf16"}, 16),  # AMD Zen 4/5, Intel Cooper Lake
    "sapphirerapids": (V4 | {"avx512_bf16", "amx_tile", "amx_bf16", "avx512_fp16"}, 16),  # AMX
}
# Levels checked at run time where the CPU can run them and its own (-march=native) build
# takes other paths: the widening path at each register width a user's CPU may have. (AVX-512
# BF16 and AMX run in the main tests on the machines that have them; SSE2-only x86-64 is
# compiled, not run: no server CPU of the last decade lacks AVX2.)
RUN_TARGETS = ("x86-64-v3", "x86-64-v4")

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 targets")


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.fixture(scope="module")
def compiler_env():
    try:
        cpu_library._compiler()
    except cpu_library.KernelBuildError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_source_compiles_for_the_target(target, compiler_env, tmp_path):
    # -O1: code is generated (an intrinsic the target lacks fails there) in half -O3's time.
    objects = cpu_library.compile_sources(tmp_path, target, os.cpu_count() or 1, ("-O1", *cpu_library.CXX_FLAGS[1:]))
    assert sorted(o.name for o in objects) == sorted(f"{s.stem}.o" for s in cpu_library.SOURCE_DIR.glob("*.cc"))
    assert all(o.stat().st_size > 0 for o in objects)


@pytest.mark.parametrize("target", RUN_TARGETS)
def test_kernels_are_right_when_built_for_the_target(target, compiler_env, tmp_path):
    needs, lanes = TARGETS[target]
    if missing := needs - _cpu_flags():
        pytest.skip(f"this CPU cannot run a {target} build (no {', '.join(sorted(missing))})")
    expected_paths = {"amx_tiles": False, "avx512_bf16": False, "widen_lanes": lanes}
    if cpu_paths() == expected_paths:
        pytest.skip(f"this CPU's own build takes the {target} paths, which the other kernel tests run")
    env = {**os.environ, cpu_library.ARCH_ENV_VAR: target, "TESSERA_KERNEL_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "tests.kernels.kernel_paths_check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # A build below AVX-512 BF16 takes neither AMX nor vdpbf16ps: the widening path serves all rows.
    assert report["paths"] == expected_paths
    errors = report["errors"]
    assert len(errors) == 2 * 6 * 3 + 6 + 2 + 3
    assert errors["logits ids"] == 0
    # float32 sums in another order than numpy: 1e-5; bfloat16 outputs are rounded: 1e-2.
    bad = {name: e for name, e in errors.items() if e > (1e-2 if "bfloat16" in name else 1e-5)}
    assert not bad
