"""`tessera worker`: an engine behind a gRPC server (serving/rpc/tessera.proto).

The servicer sees the engine only as an `EngineClient`, so the same server runs the real
engine (`tessera worker`) and the simulated one of the 64-worker test (perf/sim_engine.py).
Cancelling a Generate call closes its engine stream, which aborts the request before the
engine's next step. The engine's KV events are drained by one task here and fanned out: to
the etcd summary (serving/registry.py) and to every KvEvents subscriber, each of which first
gets the keys cached now, so a gateway that connects late knows what the worker holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ops.startup import timeline
from runtime.block_manager import BlockStored
from runtime.engine_client import EngineClient, EngineDeadError
from runtime.failover import BackendDegradedError
from serving.coalesce import coalesced
from serving.registry import KvSummary, WorkerRecord, WorkerRegistration
from serving.remote_engine import RETRY_AFTER_KEY
from serving.rpc import convert
from serving.rpc import tessera_pb2 as pb
from serving.rpc import tessera_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json")
SERVICE = "tessera.v1.Worker"
SUBSCRIBER_QUEUE = 4096  # KV event batches a slow subscriber may lag by; beyond, it is cut off and reconnects


class KvEventHub:
    """One drain of `engine.kv_events()`, fanned out to the summary and to subscribers.

    A dead engine ends its stream (EngineDeadError). A failover engine (runtime/failover.py)
    serves a new loop once its accelerator passes a probe: the drain subscribes again every
    `RESUBSCRIBE_S` meanwhile, so the summary and the subscribers (who stay connected) follow
    the recovered engine: its AllBlocksCleared (the recovery dropped the prefix cache), then
    what it caches. An engine that never recovers is simply retried until the hub closes."""

    RESUBSCRIBE_S = 0.5

    def __init__(self, engine: EngineClient, summary: KvSummary):
        self.engine, self.summary = engine, summary
        self._subscribers: set[asyncio.Queue] = set()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        dead = False
        try:
            while True:
                try:
                    async for event in self.engine.kv_events():
                        if dead:
                            log.warning("KV events resumed: the engine serves again")
                            dead = False
                        self._fan_out(event)
                    return  # the engine's stream ended (it shut down)
                except EngineDeadError:
                    if not dead:
                        log.warning("KV events stopped: the engine is dead; subscribing again until it recovers")
                        dead = True
                await asyncio.sleep(self.RESUBSCRIBE_S)
        finally:
            for queue in self._subscribers:
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(None)

    def _fan_out(self, event) -> None:
        self.summary.apply(event)
        for queue in list(self._subscribers):
            if queue.full():  # too slow: cut off (it reconnects and gets a fresh snapshot)
                self._subscribers.discard(queue)
                queue.put_nowait(None)
            else:
                queue.put_nowait(event)

    def subscribe(self) -> tuple[list, asyncio.Queue]:
        """(a snapshot of the keys held now, as one event, and the queue of later events)."""
        queue: asyncio.Queue = asyncio.Queue(SUBSCRIBER_QUEUE + 1)
        self._subscribers.add(queue)
        keys = tuple(self.summary.keys)
        return ([BlockStored(keys, b"", (), 0)] if keys else []), queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._subscribers.discard(queue)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class WorkerServicer(pb_grpc.WorkerServicer):
    def __init__(self, engine: EngineClient, info: pb.WorkerInfo, hub: KvEventHub):
        self.engine, self.info, self.hub = engine, info, hub
        self.num_in_flight = 0

    async def Info(self, request, context) -> pb.WorkerInfo:  # noqa: N802 - the gRPC method's name
        return self.info

    async def Generate(self, message: pb.GenerateRequest, context):  # noqa: N802
        try:
            params = convert.params_from_proto(message.params)
            request = self.engine.make_request(list(message.prompt_token_ids), params,
                                               **convert.request_fields(message))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except BackendDegradedError as e:  # too large for its CPU (runtime/failover.py): a gateway tries another,
            # and with none left answers 503 with this Retry-After
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"backend_degraded: {e}",
                                trailing_metadata=((RETRY_AFTER_KEY, str(e.retry_after_s)),))
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine_dead: {e}")
        self.num_in_flight += 1
        try:
            # Closing the stream (a cancelled call ends this generator) aborts the request. Outputs
            # that queued while gRPC was busy travel as one message (serving/coalesce.py).
            async with contextlib.aclosing(coalesced(self.engine.stream(request))) as outputs:
                async for output in outputs:
                    yield convert.output_to_proto(output)
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine_dead: {e}")
        except ValueError as e:  # an id in use
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        except Exception as e:  # noqa: BLE001 - EngineStepError: this request failed, the engine lives
            yield pb.GenerateResponse(request_id=message.request_id, finished=True, error=str(e))
        finally:
            self.num_in_flight -= 1

    async def Abort(self, message: pb.AbortRequest, context) -> pb.AbortResponse:  # noqa: N802
        self.engine.abort(message.request_id)
        return pb.AbortResponse()

    async def Stats(self, request, context) -> pb.WorkerStats:  # noqa: N802
        stats, state = self.engine.stats(), self.engine.health()
        values = {name: getattr(stats, name) for name in STATS_FIELDS}
        return pb.WorkerStats(**values, running=state.running, error=state.error or "",
                              num_in_flight=self.num_in_flight)

    async def KvEvents(self, request, context):  # noqa: N802
        snapshot, queue = self.hub.subscribe()
        try:
            if snapshot:
                yield pb.KvEventBatch(events=[convert.kv_event_to_proto(e) for e in snapshot])
            while True:
                events = [await queue.get()]
                while not queue.empty():
                    events.append(queue.get_nowait())
                live = [e for e in events if e is not None]
                if live:
                    yield pb.KvEventBatch(events=[convert.kv_event_to_proto(e) for e in live])
                if len(live) < len(events):  # cut off, or the engine stopped
                    return
        finally:
            self.hub.unsubscribe(queue)


STATS_FIELDS = tuple(f.name for f in pb.WorkerStats.DESCRIPTOR.fields
                     if f.name not in ("running", "error", "num_in_flight"))


def worker_info(engine: EngineClient, worker_id: str, model_digest: str, pool: str, region: str,
                tokenizer_dir: str | Path | None) -> pb.WorkerInfo:
    files = {}
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            path = Path(tokenizer_dir) / name
            if path.is_file():
                files[name] = path.read_bytes()
    return pb.WorkerInfo(worker_id=worker_id, model_id=engine.model_id, model_digest=model_digest,
                         limits=convert.limits_to_proto(engine.limits),
                         generation_defaults_json=json.dumps(engine.generation_defaults),
                         tokenizer_files=files, pool=pool, region=region)


# -- TLS ------------------------------------------------------------------------------------

def server_credentials(cert: str, key: str, ca: str | None) -> grpc.ServerCredentials:
    """TLS with the worker's certificate; with `ca`, mutual: clients must show a certificate it signed."""
    pair = [(Path(key).read_bytes(), Path(cert).read_bytes())]
    root = Path(ca).read_bytes() if ca else None
    return grpc.ssl_server_credentials(pair, root_certificates=root, require_client_auth=root is not None)


def channel_credentials(ca: str | None, cert: str | None, key: str | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca else None,
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )


# -- the server -----------------------------------------------------------------------------

class WorkerServer:
    """The gRPC server, the health service and (with etcd) the registration, for one engine."""

    def __init__(self, engine: EngineClient, *, host: str = "127.0.0.1", port: int = 0, worker_id: str | None = None,
                 pool: str = "default", region: str = "local", model_digest: str = "",
                 tokenizer_dir: str | Path | None = None, etcd: str | None = None, advertise: str | None = None,
                 lease_ttl_s: float = 2.0, mig_device: str | None = None,
                 tls: tuple[str, str, str | None] | None = None):
        self.engine = engine
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.host, self.port, self.tls = host, port, tls
        self.pool, self.region, self.model_digest = pool, region, model_digest
        self.tokenizer_dir, self.etcd, self.advertise = tokenizer_dir, etcd, advertise
        self.lease_ttl_s, self.mig_device = lease_ttl_s, mig_device
        self.registration: WorkerRegistration | None = None
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._watch: asyncio.Task | None = None

    async def start(self) -> int:
        self.engine.start()
        summary = KvSummary()
        self.hub = KvEventHub(self.engine, summary)
        self.hub.start()
        info = worker_info(self.engine, self.worker_id, self.model_digest, self.pool, self.region, self.tokenizer_dir)
        self.servicer = WorkerServicer(self.engine, info, self.hub)
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_WorkerServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"{self.host}:{self.port}"
        self.port = (server.add_secure_port(address, server_credentials(*self.tls)) if self.tls
                     else server.add_insecure_port(address))
        await server.start()
        self._server = server
        await self._set_health()
        self._watch = asyncio.ensure_future(self._watch_health())
        if self.etcd:
            from serving.registry import connect

            limits = self.engine.limits
            record = WorkerRecord(
                self.worker_id, self.advertise or f"{self.host}:{self.port}", self.pool, self.region,
                self.engine.model_id, self.model_digest, [],
                {"max_num_seqs": limits.max_num_seqs, "num_blocks": limits.num_blocks,
                 "block_size": limits.block_size, "max_model_len": limits.max_model_len}, self.mig_device,
            )
            self.registration = WorkerRegistration(connect(self.etcd), record, self.lease_ttl_s)
            self.registration.summary = summary
            await self.registration.start()
        log.info("worker %s serving gRPC on %s:%d", self.worker_id, self.host, self.port)
        return self.port

    async def _set_health(self) -> None:
        engine_health = self.engine.health()
        status = (health_pb2.HealthCheckResponse.SERVING if engine_health.running
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", SERVICE):
            await self.health.set(service, status)
        registration = self.registration
        if registration is not None and registration.record.backend_mode != engine_health.mode:
            registration.record.backend_mode = engine_health.mode  # the gateway prefers accelerator workers
            with contextlib.suppress(Exception):
                await registration.update()

    async def _watch_health(self) -> None:
        while True:  # the engine's state, as the health service reports it
            await asyncio.sleep(0.5)
            await self._set_health()

    async def stop(self, grace_s: float = 5.0) -> None:
        """Leave the registry first (no new traffic), then let calls in flight finish for `grace_s`."""
        if self.registration is not None:
            await self.registration.close()
        if self._watch is not None:
            self._watch.cancel()
        with contextlib.suppress(Exception):
            await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace_s)
        await self.hub.close()


async def run_worker(server: WorkerServer, drain_timeout_s: float) -> None:
    """Serve until SIGTERM or SIGINT, then leave the registry and drain."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    timeline.ready("gRPC server start")
    print(f"tessera worker {server.worker_id} listening on {server.host}:{server.port}", flush=True)
    await stop.wait()
    log.info("worker %s: draining for up to %.0fs", server.worker_id, drain_timeout_s)
    await server.stop(drain_timeout_s)
    server.engine.shutdown()


def worker_main(config) -> int:
    """`tessera worker`: load the model as `tessera serve` does, then serve it over gRPC."""
    from serving import observability
    from serving.default_model import resolve_model
    from serving.registry import model_digest
    from serving.server import build_async_engine, end_of_imports

    timeline.begin()
    observability.configure(config)
    end_of_imports()
    if config.mig_device:  # before jax creates its GPU client: this process sees only that slice
        os.environ["CUDA_VISIBLE_DEVICES"] = config.mig_device
    model_dir = resolve_model(config.model, config.model_cache_dir)
    timeline.mark("model files")
    engine, _ = build_async_engine(config, model_dir)
    tls = (config.grpc_tls_cert, config.grpc_tls_key, config.grpc_tls_ca) if config.grpc_tls_cert else None
    server = WorkerServer(engine, host=config.host, port=config.grpc_port, worker_id=config.worker_id,
                          pool=config.pool, region=config.region, model_digest=model_digest(model_dir),
                          tokenizer_dir=model_dir, etcd=config.etcd, advertise=config.advertise_address,
                          lease_ttl_s=config.lease_ttl_s, mig_device=config.mig_device, tls=tls)
    asyncio.run(run_worker(server, config.drain_timeout_s))
    return 0
