"""Real etcd and real `tessera worker` / `tessera gateway` processes on loopback, for tests and perf.

Each start returns once the process is ready (etcd answers, a worker printed its port, a
gateway answers /ready) and each handle's `stop()` ends it (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
# Small engine settings: warm-up compiles two buckets; a few concurrent streams fit.
WORKER_ENV = {"TESSERA_MAX_NUM_SEQS": "8", "TESSERA_MAX_NUM_BATCHED_TOKENS": "64", "TESSERA_MAX_MODEL_LEN": "256",
              "TESSERA_TOKEN_BUCKETS": "8,64", "TESSERA_NUM_BLOCKS": "128", "TESSERA_ALLOW_UNSIGNED": "true",
              "TESSERA_LOG_LEVEL": "warning"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Process:
    process: subprocess.Popen
    address: str = ""
    lines: list[str] = field(default_factory=list)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(5)

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)


def _spawn(command: list[str], env: dict | None = None) -> Process:
    process = subprocess.Popen(command, env={**os.environ, **(env or {})}, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    handle = Process(process)
    threading.Thread(target=handle._pump, daemon=True).start()
    return handle


def _wait_for(handle: Process, ready, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        if handle.process.poll() is not None:
            raise RuntimeError(f"{what} exited ({handle.process.returncode}):\n{handle.output[-4000:]}")
        time.sleep(0.05)
    handle.stop()
    raise RuntimeError(f"{what} not ready in {timeout}s:\n{handle.output[-4000:]}")


def start_etcd() -> tuple[Process, str]:
    """A single-member etcd on free loopback ports, its data in a temporary folder; (handle, host:port)."""
    data = tempfile.mkdtemp(prefix="tessera-etcd-")
    client, peer = free_port(), free_port()
    handle = _spawn([shutil.which("etcd") or "etcd", "--data-dir", data, "--name", "test",
                     "--listen-client-urls", f"http://127.0.0.1:{client}",
                     "--advertise-client-urls", f"http://127.0.0.1:{client}",
                     "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                     "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                     "--initial-cluster", f"test=http://127.0.0.1:{peer}",
                     "--log-level", "error"], env={"ETCD_UNSUPPORTED_ARCH": os.environ.get("ETCD_UNSUPPORTED_ARCH", "")})

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{client}/health", timeout=1).json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    _wait_for(handle, ready, 30, "etcd")
    original_stop = handle.stop

    def stop(timeout: float = 10.0) -> None:
        original_stop(timeout)
        shutil.rmtree(data, ignore_errors=True)

    handle.stop = stop
    handle.address = f"127.0.0.1:{client}"
    return handle, handle.address


_LISTENING = re.compile(r"tessera worker (\S+) listening on ([\d.]+:\d+)")


def start_worker(model: str | Path | None, etcd: str | None = None, *, env: dict | None = None,
                 args: list[str] = (), module: str = "serving.cli", timeout: float = 120) -> Process:
    """`tessera worker` (or another module taking the same flags) on a free port."""
    settings = {**WORKER_ENV, "TESSERA_GRPC_PORT": "0", **(env or {})}
    if model is not None:
        settings["TESSERA_MODEL"] = str(model)
    if etcd:
        settings["TESSERA_ETCD"] = etcd
    command = [sys.executable, "-m", module] + (["worker"] if module == "serving.cli" else []) + list(args)
    handle = _spawn(command, settings)

    def ready():
        match = _LISTENING.search(handle.output)
        return match and match.group(2)

    handle.address = _wait_for(handle, ready, timeout, "worker")
    handle.worker_id = _LISTENING.search(handle.output).group(1)
    return handle


def start_gateway(etcd: str, *, env: dict | None = None, timeout: float = 60) -> Process:
    return _start_http("gateway", {"TESSERA_ETCD": etcd, **(env or {})}, timeout)


def start_serve(*, env: dict | None = None, timeout: float = 300) -> Process:
    """`tessera serve` (the demo model unless TESSERA_MODEL is given) with the workers' engine settings."""
    return _start_http("serve", {**WORKER_ENV, **(env or {})}, timeout)


def _start_http(command: str, env: dict, timeout: float) -> Process:
    port = free_port()
    settings = {"TESSERA_PORT": str(port), "TESSERA_LOG_LEVEL": "warning", "TESSERA_TOKENIZER_WORKERS": "1", **env}
    handle = _spawn([sys.executable, "-m", "serving.cli", command], settings)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(url + "/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    _wait_for(handle, ready, timeout, command)
    handle.address = url
    return handle


def start_sim_workers(etcd: str, pools: dict[str, int], timeout: float = 120) -> list[Process]:
    """`count` simulated workers (perf/sim_worker.py: the real gRPC server and registration over a
    simulated engine, no jax) per pool, started together."""
    handles = []
    for pool, count in pools.items():
        for i in range(count):
            settings = {"TESSERA_ETCD": etcd, "TESSERA_POOL": pool, "TESSERA_WORKER_ID": f"sim-{pool}-{i}",
                        "TESSERA_GRPC_PORT": "0"}
            handles.append(_spawn([sys.executable, "-m", "perf.sim_worker"], settings))
    for handle in handles:
        def ready(handle=handle):
            match = _LISTENING.search(handle.output)
            return match and match.group(2)

        handle.address = _wait_for(handle, ready, timeout, "simulated worker")
        handle.worker_id = _LISTENING.search(handle.output).group(1)
    return handles


def stop_cluster(gateway: Process | None, workers: list[Process], etcd: Process) -> None:
    """Stop a gateway, its workers (all signalled first, so they exit together) and etcd."""
    if gateway is not None:
        gateway.stop()
    for worker in workers:
        worker.process.terminate()
    for worker in workers:
        worker.stop(5)
    etcd.stop()


def put_pool(etcd: str, pool: str, weight: float, drain: bool = False) -> None:
    """An operator's pool key (serving/registry.py), as `etcdctl put` would write it."""
    import asyncio
    import json

    from serving import registry

    async def go():
        async with registry.connect(etcd) as client:
            await client.put((registry.POOLS + pool).encode(), json.dumps({"weight": weight, "drain": drain}).encode())

    asyncio.run(go())
