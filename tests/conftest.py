import atexit
import os
import shutil
import tempfile

# Eight CPU devices for the sharding tests; must be set before jax starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The engine's fault injection (runtime/faults.py) is for tests only: on for this process.
os.environ.setdefault("TESSERA_FAULT_INJECTION", "1")
# The CLI turns on jax's persistent compilation cache; keep the tests' cache out of $HOME.
if "TESSERA_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["TESSERA_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="tessera-xla-")
    atexit.register(shutil.rmtree, os.environ["TESSERA_COMPILATION_CACHE_DIR"], ignore_errors=True)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.helpers.tiny_checkpoint import build_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(arch, layout="v5", **overrides) -> folder, built once per session."""
    built: dict[tuple, Path] = {}

    def get(arch: str, layout: str = "v5", **overrides) -> Path:
        key = (arch, layout, tuple(sorted(overrides.items())))
        if key not in built:
            out = tmp_path_factory.mktemp(f"{arch}-{layout}")
            built[key] = build_checkpoint(out, arch, layout=layout, **overrides)
        return built[key]

    return get
