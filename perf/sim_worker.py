"""A `tessera worker` over the simulated engine (perf/sim_engine.py): the real gRPC server,
health service and etcd registration, in a process without jax. Same TESSERA_* settings as
`tessera worker` for where it listens and registers (etcd, pool, region, worker_id, grpc_port).

    python -m perf.sim_worker
"""

from __future__ import annotations

import asyncio
import os

from perf.sim_engine import SimEngine
from serving.default_model import resolve_model
from serving.registry import model_digest
from serving.worker import WorkerServer, run_worker


def main() -> None:
    env = os.environ.get
    model_dir = resolve_model(None)  # its tokenizer and digest: gateways treat it as the demo model
    server = WorkerServer(SimEngine(), port=int(env("TESSERA_GRPC_PORT", "0")), worker_id=env("TESSERA_WORKER_ID"),
                          pool=env("TESSERA_POOL", "default"), region=env("TESSERA_REGION", "local"),
                          model_digest=model_digest(model_dir), tokenizer_dir=model_dir, etcd=env("TESSERA_ETCD"),
                          lease_ttl_s=float(env("TESSERA_LEASE_TTL_S", "2")))
    asyncio.run(run_worker(server, drain_timeout_s=2.0))


if __name__ == "__main__":
    main()
