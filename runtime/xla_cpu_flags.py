"""XLA flags Tessera sets for the CPU backend before jax starts it.

oneDNN for XLA CPU's matrix products: measured on the 2-core development machine, a
[512, 576] x [576, 1536] MLP chain ran at 175 GFLOP/s against 120 with XLA's default
kernels, and the one-row (decode) products streamed 34 GB/s against 20. Flags the user
already set win; `TESSERA_XLA_CPU_DEFAULTS=0` leaves XLA_FLAGS alone. XLA reads these when
the backend starts (the first computation), so this runs when `runtime` is imported.
GPU backends ignore xla_cpu_* flags.
"""

from __future__ import annotations

import os

CPU_FLAGS = ("--xla_cpu_use_onednn=true",)


def apply_cpu_flags() -> None:
    if os.environ.get("TESSERA_XLA_CPU_DEFAULTS", "1") == "0":
        return
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in CPU_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags
