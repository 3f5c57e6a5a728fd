"""`tessera gateway`: the HTTP API of `tessera serve` in front of the workers registered in etcd.

`GatewayEngine` is an `EngineClient`, so the app, auth, rate limits and guardrails are the
same code as in `tessera serve`; only where a request runs differs. It lists and watches
`/tessera/v1/` (serving/registry.py): a worker record that appears is dialled (handshake,
Stats polls, a KvEvents subscription); one whose lease vanishes is dropped at once; pool
weights and drain flags take effect as they change. A worker whose KvEvents stream breaks
(the process died: its socket closed) or whose Stats poll fails is out of routing at once.

Failover: a request whose worker is lost before its first output is sent to another worker,
transparently (each worker is tried once); after the first output the stream ends with an
error (an SSE error event), counted in `tessera:gateway_stream_errors_total`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

from aetcd.rtypes import EventKind

from runtime.engine_client import EngineDeadError, EngineHealth, EngineStepError, KVEvent
from runtime.failover import BackendDegradedError
from runtime.outputs import RequestOutput
from runtime.request import Request, SamplingParams
from runtime.request_limits import RequestLimits
from serving import registry
from serving.autoscale import WorkerLoad, hints
from serving.coalesce import coalesced
from serving.remote_engine import RemoteEngine, WorkerDegradedError, WorkerLostError, checked_request
from serving.routing import Router, RoutingCosts, WorkerView, prompt_block_keys
from serving.rpc import tessera_pb2 as pb

log = logging.getLogger(__name__)

RECONNECT_S = 0.25


class WorkerHandle:
    """One registered worker: its gRPC client, its routing view and the tasks that feed it."""

    def __init__(self, record: registry.WorkerRecord, gateway: GatewayEngine):
        self.record, self.gateway = record, gateway
        self.view = WorkerView(record.worker_id, record.pool, record.region,
                               record.capacity.get("block_size", 16), record.capacity.get("max_num_seqs", 16))
        self.engine: RemoteEngine | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        """Dial, then follow its KV events and stats until it is removed; redial on a break."""
        gateway = self.gateway
        while True:
            engine = RemoteEngine(self.record.address, gateway.credentials, gateway.stats_interval_s,
                                  gateway.server_name)
            try:
                await engine.connect(timeout=5.0, tokenizer=gateway.tokenizer)
                if engine.info.model_digest != gateway.info.model_digest:
                    log.warning("worker %s serves another model (digest %s); not routing to it",
                                self.record.worker_id, engine.info.model_digest[:12])
                    await engine.close()
                    return
                self.engine = engine
                poller = asyncio.ensure_future(self._poll(engine))
                try:
                    async for event in engine.kv_events():
                        self.view.apply(event)
                    raise WorkerLostError("the KV event stream ended")
                finally:
                    poller.cancel()
            except asyncio.CancelledError:
                await engine.close()
                raise
            except Exception as e:  # noqa: BLE001 - a lost worker: out of routing, then redial
                self.mark_down(e)
                await engine.close()
            await asyncio.sleep(RECONNECT_S)

    async def _poll(self, engine: RemoteEngine) -> None:
        while True:
            stats = await engine.poll_stats()
            if stats is None:
                self.mark_down(engine.health().error or "stats poll failed")
            else:
                self.view.reported_load = stats.num_requests_running + stats.num_requests_waiting
                self.view.healthy = stats.running
            await asyncio.sleep(self.gateway.stats_interval_s)

    def mark_down(self, reason) -> None:
        if self.view.healthy:
            log.warning("worker %s out of routing: %s", self.record.worker_id, reason)
        self.view.healthy = False
        self.view.cached.clear()

    async def close(self) -> None:
        self.view.healthy = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.engine is not None:
            await self.engine.close()

    def load(self) -> WorkerLoad:
        stats = self.engine.worker_stats if self.engine is not None else None
        age = self.engine.stats_age_s if self.engine is not None else float("inf")
        return WorkerLoad(self.record.worker_id, self.record.pool,
                          stats.num_requests_running if stats else 0, stats.num_requests_waiting if stats else 0,
                          self.view.max_num_seqs, stats.kv_cache_usage_perc if stats else 0.0, age,
                          self.view.healthy)


async def discover(endpoint: str, wait_s: float = 60.0) -> tuple[pb.WorkerInfo, int]:
    """Before the app starts: a registered worker's handshake (the model's facts for the API)
    and the request seats of all workers registered now."""
    deadline = time.monotonic() + wait_s
    async with registry.connect(endpoint) as client:
        while True:
            records = [registry.WorkerRecord.from_json(kv.value)
                       for kv in await client.get_prefix(registry.WORKERS.encode())]
            for record in records:
                engine = RemoteEngine(record.address)
                try:
                    await engine.connect(timeout=5.0)
                    seats = sum(r.capacity.get("max_num_seqs", 0) for r in records
                                if r.model_digest == engine.info.model_digest)
                    return engine.info, max(seats, engine.max_num_seqs)
                except WorkerLostError as e:
                    log.warning("worker %s not reachable yet: %s", record.worker_id, e)
                finally:
                    await engine.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"no reachable worker registered in etcd at {endpoint} after {wait_s:.0f}s")
            await asyncio.sleep(0.5)


class GatewayEngine:
    def __init__(self, endpoint: str, info: pb.WorkerInfo, seats: int, *, costs: RoutingCosts | None = None,
                 policy: str = "kv", stats_interval_s: float = 0.5, credentials=None, server_name: str | None = None,
                 metrics=None, autoscale_target: float = 0.75, stale_after_s: float = 3.0):
        from serving.remote_engine import tokenizer_from_files
        from serving.rpc import convert

        self.endpoint, self.info, self.seats = endpoint, info, seats
        self.autoscale_target, self.stale_after_s = autoscale_target, stale_after_s
        self.credentials, self.server_name, self.stats_interval_s = credentials, server_name, stats_interval_s
        self._limits = convert.limits_from_proto(info.limits)
        self._tokenizer = tokenizer_from_files(dict(info.tokenizer_files))
        self._generation_defaults = json.loads(info.generation_defaults_json or "{}")  # read per request
        self.router = Router(costs, policy)
        self.handles: dict[str, WorkerHandle] = {}
        self.metrics = metrics
        self.gateway_metrics = None
        if metrics is not None:
            from ops.metrics import GatewayMetrics

            self.gateway_metrics = GatewayMetrics(metrics.registry, metrics.model_name)
        self.routing_seconds: list[float] = []  # recent routing decisions, for perf (bounded)
        self._serving: dict[str, WorkerHandle] = {}  # request id -> the worker running it now
        self._task: asyncio.Task | None = None
        self._drain_flags: set[str] = set()  # workers with a drain key
        self._reporter: asyncio.Task | None = None

    # -- what serving needs to know about the model (a worker's handshake) -----------------

    @property
    def model_id(self) -> str:
        return self.info.model_id

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def limits(self) -> RequestLimits:
        return self._limits

    @property
    def max_model_len(self) -> int:
        return self._limits.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self.seats

    @property
    def generation_defaults(self) -> dict:
        return self._generation_defaults

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._follow_registry())
            self._reporter = asyncio.ensure_future(self._report())

    def shutdown(self, timeout: float = 10.0) -> None:
        for task in (self._task, self._reporter):
            if task is not None:
                task.cancel()
        self._task = self._reporter = None

    async def _report(self) -> None:
        """The cluster's gauges (vLLM's names, summed over workers) and the autoscale hints, as metrics."""
        while True:
            await asyncio.sleep(self.stats_interval_s)
            if self.metrics is None:
                continue
            try:
                self.metrics.on_step(self.stats(), 0)
                self.gateway_metrics.report(self.autoscale_hints())
            except Exception:  # noqa: BLE001 - metrics must never stop routing
                log.exception("gateway metrics failed")

    async def close(self) -> None:
        self.shutdown()
        for handle in list(self.handles.values()):
            await handle.close()
        self.handles.clear()

    async def _follow_registry(self) -> None:
        """List, then watch from the listing's revision; on a break, list and watch again."""
        while True:
            try:
                async with registry.connect(self.endpoint) as client:
                    listing = await client.get_prefix(registry.PREFIX.encode())
                    present = set()
                    for kv in listing:
                        present.add(kv.key)
                        self._apply_put(kv.key.decode(), kv.value)
                    for worker_id in [w for w in self.handles
                                      if (registry.WORKERS + w).encode() not in present]:
                        await self._remove(worker_id)
                    watch = await client.watch_prefix(registry.PREFIX.encode(),
                                                      start_revision=listing.header.revision + 1)
                    async for event in watch:
                        key = event.kv.key.decode()
                        if event.kind == EventKind.DELETE:
                            await self._apply_delete(key)
                        else:
                            self._apply_put(key, event.kv.value)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - etcd away: keep routing to what we know, retry
                log.warning("gateway: etcd watch failed (%r); retrying", e)
                await asyncio.sleep(1.0)

    def _apply_put(self, key: str, value: bytes) -> None:
        if key.startswith(registry.WORKERS):
            record = registry.WorkerRecord.from_json(value)
            old = self.handles.get(record.worker_id)
            if old is not None and old.record.address == record.address:
                old.record = record  # the same worker re-written: its backend mode changed
                old.view.degraded = record.backend_mode != "accelerator"
                return
            if old is not None:
                asyncio.ensure_future(old.close())
            handle = WorkerHandle(record, self)
            handle.view.drained = self._drained(record.worker_id)
            handle.view.degraded = record.backend_mode != "accelerator"
            self.handles[record.worker_id] = handle
            self.router.workers[record.worker_id] = handle.view
            handle.start()
        elif key.startswith(registry.POOLS):
            self.router.pools[key.removeprefix(registry.POOLS)] = registry.PoolConfig.from_json(value)
        elif key.startswith(registry.DRAIN):
            self._drain_flags.add(key.removeprefix(registry.DRAIN))
            self._set_drained(key.removeprefix(registry.DRAIN))

    async def _apply_delete(self, key: str) -> None:
        if key.startswith(registry.WORKERS):
            await self._remove(key.removeprefix(registry.WORKERS))
        elif key.startswith(registry.POOLS):
            self.router.pools.pop(key.removeprefix(registry.POOLS), None)
        elif key.startswith(registry.DRAIN):
            self._drain_flags.discard(key.removeprefix(registry.DRAIN))
            self._set_drained(key.removeprefix(registry.DRAIN))

    def _drained(self, worker_id: str) -> bool:
        return worker_id in self._drain_flags

    def _set_drained(self, worker_id: str) -> None:
        handle = self.handles.get(worker_id)
        if handle is not None:
            handle.view.drained = self._drained(worker_id)

    async def _remove(self, worker_id: str) -> None:
        handle = self.handles.pop(worker_id, None)
        self.router.workers.pop(worker_id, None)
        if handle is not None:
            log.info("worker %s left the registry", worker_id)
            await handle.close()

    # -- requests ---------------------------------------------------------------------------

    def make_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                     **request_fields) -> Request:
        return checked_request(self._tokenizer, self._limits, prompt, params, request_id, **request_fields)

    def pick(self, request: Request, keys: list[bytes], tried: set[str]) -> WorkerHandle | None:
        start = time.perf_counter()
        view = self.router.pick(request.num_prompt_tokens, keys, tried)
        elapsed = time.perf_counter() - start
        self.routing_seconds.append(elapsed)
        if len(self.routing_seconds) > 100_000:
            del self.routing_seconds[:50_000]
        if self.gateway_metrics is not None:
            self.gateway_metrics.routing_seconds.observe(elapsed)
        return None if view is None else self.handles.get(view.worker_id)

    async def stream(self, request: Request) -> AsyncIterator[RequestOutput]:
        block_size = self._limits.block_size
        keys = prompt_block_keys(request.prompt_token_ids, block_size, self.info.model_id, request.adapter_id,
                                 request.cache_salt)
        tried: set[str] = set()
        retry_after_s: int | None = None  # the soonest a degraded worker that refused it may take it
        while True:
            handle = self.pick(request, keys, tried)
            if handle is None or handle.engine is None:
                if retry_after_s is not None:  # 503 backend_degraded with Retry-After, as the worker would answer
                    raise BackendDegradedError(f"no worker can serve this request now (tried {len(tried)}; "
                                               "degraded ones serve only smaller prompts)", retry_after_s)
                raise EngineDeadError("no worker is available for this request" +
                                      (f" (tried {len(tried)})" if tried else ""))
            tried.add(handle.record.worker_id)
            started = False
            handle.view.in_flight += 1
            self._serving[request.request_id] = handle
            try:
                async with contextlib.aclosing(coalesced(handle.engine.stream(request))) as outputs:
                    async for output in outputs:
                        started = True
                        if output.finished:
                            self._count_finished(output, handle)
                        yield output
                return
            except WorkerDegradedError as e:  # alive, serving smaller prompts: kept in routing
                retry_after_s = e.retry_after_s if retry_after_s is None else min(retry_after_s, e.retry_after_s)
                if self.gateway_metrics is not None:
                    self.gateway_metrics.retries.inc()
                log.info("request %s: worker %s is degraded and refused it; trying another", request.request_id,
                         handle.record.worker_id)
            except WorkerLostError as e:
                handle.mark_down(e)
                if started:
                    if self.gateway_metrics is not None:
                        self.gateway_metrics.stream_errors.inc()
                    raise EngineStepError(f"worker {handle.record.worker_id} was lost mid-stream") from None
                if self.gateway_metrics is not None:
                    self.gateway_metrics.retries.inc()
                log.warning("request %s: worker %s lost before the first token; retrying", request.request_id,
                            handle.record.worker_id)
            finally:
                handle.view.in_flight -= 1
                self._serving.pop(request.request_id, None)

    def _count_finished(self, output: RequestOutput, handle: WorkerHandle) -> None:
        if self.gateway_metrics is not None:
            self.gateway_metrics.requests.labels(handle.record.pool, handle.record.worker_id).inc()
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.on_request_finished(output.timings, output.timings.finished_reason or "stop")

    def abort(self, request_id: str) -> None:
        handle = self._serving.get(request_id)
        if handle is not None and handle.engine is not None:
            handle.engine.abort(request_id)

    # -- state ------------------------------------------------------------------------------

    def stats(self):
        """The sum over workers (usage and fragmentation: the mean)."""
        from runtime.engine import EngineStats

        from serving.worker import STATS_FIELDS

        each = [h.engine.worker_stats for h in self.handles.values()
                if h.engine is not None and h.engine.worker_stats is not None]
        values = {name: sum(getattr(s, name) for s in each) for name in STATS_FIELDS}
        for name in ("kv_cache_usage_perc", "kv_cache_fragmentation_ratio"):
            values[name] = values[name] / len(each) if each else 0.0
        return EngineStats(**values)

    def health(self) -> EngineHealth:
        running = self._task is not None and any(h.view.healthy for h in self.handles.values())
        return EngineHealth(running, None)

    async def kv_events(self) -> AsyncIterator[KVEvent]:
        """The gateway holds no cache of its own: no events (each worker's reach it by gRPC)."""
        return
        yield

    def loads(self) -> list[WorkerLoad]:
        return [h.load() for h in self.handles.values()]

    def autoscale_hints(self) -> dict:
        return hints(self.loads(), self.autoscale_target, self.stale_after_s)


def gateway_main(config) -> int:
    """`tessera gateway`: find a worker, then serve the API in front of all of them."""
    import uvicorn  # noqa: F401 - fail early if the HTTP stack is missing

    from serving import observability
    from serving.app import build_app
    from serving.auth.access import configure_audit_sinks
    from serving.guardrails import Guardrails
    from serving.server import make_server
    from serving.state import ServerState
    from serving.worker import channel_credentials

    if not config.etcd:
        raise ValueError("etcd is required: the gateway finds its workers there (--etcd HOST:PORT)")
    observability.configure(config)
    configure_audit_sinks(config)
    guardrails = Guardrails.from_setting(config.guardrails)
    info, seats = asyncio.run(discover(config.etcd))
    credentials = (channel_credentials(config.grpc_tls_ca, config.grpc_tls_cert, config.grpc_tls_key)
                   if config.grpc_tls_ca else None)
    name = config.served_model_name or info.model_id
    metrics = observability.make_metrics(name, None)
    engine = GatewayEngine(config.etcd, info, seats, costs=RoutingCosts(config.route_decode_cost,
                                                                         config.route_queue_cost),
                           policy=config.route_policy, stats_interval_s=config.stats_interval_s,
                           credentials=credentials, metrics=metrics, autoscale_target=config.autoscale_target,
                           stale_after_s=config.stale_after_s)
    state = ServerState(engine, config, name, owns_engine=True, metrics=metrics, guardrails=guardrails,
                        cluster=engine)
    app = build_app(state)
    log.info("gateway for %s on http://%s:%d (etcd %s)", name, config.host, config.port, config.etcd)
    make_server(app, state, config.host, config.port, config.log_level).run()
    return 0
