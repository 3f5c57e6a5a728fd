"""One model over several processes: `jax.distributed`, then the usual tensor-parallel engine.

After `initialize()`, `jax.devices()` lists every process's devices, so `make_mesh(tensor_parallel)`
(models/sharding.py) spans processes and the engine shards heads, MLP and KV cache across them
unchanged. JAX is multi-controller: every process must run the same jitted steps on the same
inputs, in the same order. `Engine` is deterministic given the same requests added in the same
order between the same steps, so processes that each add the same requests and step in lockstep
compute one model together (tests/runtime/test_multiprocess_tp.py: 2 CPU processes on loopback
give the greedy tokens of one). On CPU the cross-process collectives are gloo's (jax 0.10 and 0.11);
on GPU they are NCCL's and need nothing here.
"""

from __future__ import annotations

import jax


def initialize(coordinator: str, num_processes: int, process_id: int, timeout_s: int = 120) -> None:
    """Join the job whose process 0 listens at `coordinator` (host:port). Call before any jax
    computation (the backends are created once)."""
    if jax.config.jax_platforms in (None, "", "cpu") or str(jax.config.jax_platforms).startswith("cpu"):
        # Without a collectives implementation, CPU computations that span processes fail at run time.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s)


def shutdown() -> None:
    jax.distributed.shutdown()
