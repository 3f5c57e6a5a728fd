"""runtime/compile_cache.py: what the persistent compilation cache keeps."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
import jax, jax.numpy as jnp
from runtime.compile_cache import enable_compilation_cache, keep_every_program

def add_one(x):
    return x + 1

def double(x):
    return x * 2

enable_compilation_cache(sys.argv[1])
jax.jit(add_one)(jnp.ones(3)).block_until_ready()  # compiles in milliseconds: not kept
with keep_every_program():  # building and warming an engine: kept however fast
    jax.jit(double)(jnp.ones(3)).block_until_ready()
print(jax.config.jax_persistent_cache_min_compile_time_secs)
"""


def test_programs_compiled_while_building_an_engine_are_kept_however_fast(tmp_path):
    # A fresh process: jax opens its persistent cache once per process.
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["1.0"]  # the threshold is back to a second afterwards
    kept = sorted(p.name.split("-")[0] for p in tmp_path.iterdir())
    assert kept == ["jit_double"]
