"""GET /health (alive), /ready (serving), /version, /metrics (Prometheus)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from litestar import Controller, Response, get
from litestar.openapi.datastructures import ResponseSpec

from serving.auth.guard import needs
from serving.auth.principal import PUBLIC, READ
from serving.errors import APIError
from serving.protocol.admin import HealthResponse, ReadyResponse, VersionResponse
from serving.state import ServerState


class HealthController(Controller):
    path = "/"
    tags = ["Operations"]

    @get("/health", operation_id="health", opt=needs(PUBLIC), summary="The process is alive (liveness)",
         responses={503: ResponseSpec(HealthResponse, description="The engine failed for good: restart the process")})
    async def health(self, server: ServerState) -> Response[HealthResponse]:
        # Liveness: only an engine that could not recover from a fault fails it, so that the
        # orchestrator restarts the process (draining and a not-yet-started loop do not).
        error = server.engine.health().error
        if error is not None:
            return Response(HealthResponse("engine failed", reason=error), status_code=503)
        return Response(HealthResponse("ok"))

    @get("/ready", operation_id="ready", opt=needs(PUBLIC), summary="The model is loaded, the engine loop runs, intake is open",
         responses={503: ResponseSpec(ReadyResponse, description="Not ready")})
    async def ready(self, server: ServerState) -> Response[ReadyResponse]:
        health, draining = server.engine.health(), server.admission.draining
        running = health.running
        reason = None if running else (f"engine loop stopped: {health.error}" if health.error
                                       else "engine loop not started")
        reason = "draining for shutdown" if draining else reason
        body = ReadyResponse("ready" if reason is None else "not ready", model_loaded=True, engine_running=running,
                             draining=draining, requests_in_flight=server.admission.in_flight, reason=reason)
        return Response(body, status_code=200 if reason is None else 503)

    @get("/v1/autoscale", operation_id="autoscale", opt=needs(READ),
         summary="Autoscaler hints: saturation per worker and pool, desired replicas per pool")
    async def autoscale(self, server: ServerState) -> dict:
        from serving.autoscale import WorkerLoad, hints

        config = server.config
        if server.cluster is not None:
            return server.cluster.autoscale_hints()
        stats = server.engine.stats()  # `tessera serve`: one worker, its numbers as fresh as its last step
        load = WorkerLoad("local", "default", stats.num_requests_running, stats.num_requests_waiting,
                          server.engine.max_num_seqs, stats.kv_cache_usage_perc, 0.0, server.engine.health().running)
        return hints([load], config.autoscale_target, config.stale_after_s)

    @get("/version", operation_id="version", opt=needs(READ), summary="Tessera's and jax's versions, the backend, the model")
    async def version(self, server: ServerState) -> VersionResponse:
        import jax

        return VersionResponse(_tessera_version(), jax.__version__, jax.default_backend(), server.model_name)

    @get("/metrics", operation_id="metrics", opt=needs(READ), summary="Prometheus metrics (prefix tessera:)",
         responses={503: ResponseSpec(None, description="Metrics are not available in this build")})
    async def metrics(self, server: ServerState) -> Response[bytes]:
        if server.metrics is None:
            raise APIError(503, "metrics are not available (ops.metrics is missing)", code="metrics_unavailable")
        if hasattr(server.metrics, "update_device_memory"):
            server.metrics.update_device_memory()  # the device's memory statistics, where it reports them
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)


def _tessera_version() -> str:
    try:
        return version("tessera-serve")
    except PackageNotFoundError:
        return "unknown"
