"""Running the server: the engine from settings, uvicorn, and draining on SIGTERM.

The first SIGTERM (or SIGINT) stops intake: new requests get 503 and /ready fails, while
in-flight requests run to their end or to `drain_timeout_s`; then uvicorn shuts down.
A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from pathlib import Path

import uvicorn

from ops.startup import resume_collector, timeline
from runtime.engine_client import EngineClient
from serving import observability
from serving.auth.access import configure_audit_sinks
from serving.config import ServerConfig
from serving.http_timeouts import timed_h11_protocol
from serving.state import ServerState

log = logging.getLogger(__name__)


def served_name(config: ServerConfig, model_dir: str | Path) -> str:
    # The default model answers to "demo", whichever folder currently provides it.
    if config.served_model_name:
        return config.served_model_name
    if config.model is None:
        return "demo"
    from serving.model_store import is_remote, model_name

    return model_name(config.model) if is_remote(config.model) else Path(model_dir).resolve().name


def check_trust(config: ServerConfig, model_dir: str | Path) -> None:
    """The signature gate, before any weight is read (raises ModelSignatureError naming the file).
    The default (demo) model is development's: without --verify-key it is served unsigned, audited."""
    from ops.model_signing import check_model_trust

    allow_unsigned = config.allow_unsigned or (config.model is None and config.verify_key is None)
    check_model_trust(model_dir, verify_key=config.verify_key, allow_unsigned=allow_unsigned,
                      model_name=served_name(config, model_dir))


def end_of_imports() -> None:
    """`tessera serve` and `worker`: everything building an engine needs is imported (and timed);
    then the collector resumes, before any model file is read: garbage from there on may hold
    large buffers."""
    import runtime.async_engine  # noqa: F401
    import runtime.compile_cache  # noqa: F401
    import runtime.engine  # noqa: F401
    import runtime.kv_tiers  # noqa: F401
    import serving.default_model  # noqa: F401
    import serving.registry  # noqa: F401

    timeline.mark("python and imports")
    resume_collector()
    timeline.mark("garbage collection")


def build_async_engine(config: ServerConfig, model_dir: str | Path) -> tuple[EngineClient, str]:
    """Check the model's signature, then load and warm it up; (the engine, its served name).
    Every load (start-up, and any reload) comes through here: the one place serving builds
    an in-process engine; everything after it sees only the EngineClient."""
    from runtime.async_engine import AsyncEngine
    from runtime.compile_cache import enable_compilation_cache, keep_every_program
    from runtime.engine import Engine
    from serving.adapter_source import adapter_folder

    check_trust(config, model_dir)
    timeline.mark("signature check")
    enable_compilation_cache(config.compilation_cache_dir)
    engine_config = config.engine_config()
    if config.kv_disk_dir:
        from runtime.kv_tiers import KvTierConfig
        from serving.registry import model_digest

        engine_config.kv_tiers = KvTierConfig(config.kv_disk_dir, model_digest(model_dir),
                                              int(config.kv_host_gib * 2**30), int(config.kv_disk_gib * 2**30))
    if engine_config.gpu_memory_utilization is not None:
        from runtime.kv_memory import apply_pool_fraction

        apply_pool_fraction(engine_config.gpu_memory_utilization)  # before jax starts a GPU backend, if it has not
    with keep_every_program():  # every start compiles the same programs: the next one loads them
        engine = Engine.from_model_dir(model_dir, config.dtype, engine_config, tensor_parallel=config.tensor_parallel)
        for adapter, path in config.lora_module_paths().items():  # a refused adapter stops start-up (AdapterError)
            engine.adapters.load(adapter, adapter_folder(config, adapter, path))
        if config.warm_up:
            engine.warm_up()
    name = served_name(config, model_dir)
    front = AsyncEngine(engine, metrics=observability.make_metrics(name, engine))
    return with_cpu_fallback(front, engine.plan.platform, engine.backend_mode(), config, model_dir), name


def with_cpu_fallback(primary: EngineClient, platform: str, backend: str, config: ServerConfig,
                      model_dir: str | Path) -> EngineClient:
    """The engine behind runtime/failover.py's FailoverEngine when --cpu-fallback asks for one."""
    mode = config.cpu_fallback
    if mode == "auto":
        mode = "off" if platform == "cpu" else "lazy"
    if mode == "off":
        return primary
    from runtime.failover import FailoverConfig, FailoverEngine, recover_async_engine

    def build_fallback() -> EngineClient:
        import jax

        from runtime.async_engine import AsyncEngine
        from runtime.engine import Engine

        engine_config = config.engine_config()  # no KV tiers: their folder belongs to the primary
        engine_config.attention_backend = engine_config.linear = engine_config.lora_kernel = None  # the CPU's own choices
        engine = Engine.from_model_dir(model_dir, config.dtype, engine_config, devices=jax.devices("cpu"))
        if config.warm_up:
            engine.warm_up()
        return AsyncEngine(engine)

    failover = FailoverConfig(config.cpu_fallback_max_prompt_tokens, keep_warm=mode == "warm",
                              probe_interval_s=config.cpu_fallback_probe_interval_s)
    return FailoverEngine(primary, build_fallback, recover_async_engine, failover, accelerator_label=backend)


def build_server_state(config: ServerConfig, engine: EngineClient | None = None) -> ServerState:
    from serving.guardrails import Guardrails

    guardrails = Guardrails.from_setting(config.guardrails)  # before the model: a bad policy fails fast
    if engine is not None:
        name = config.served_model_name or engine.model_id or "tessera"
        return ServerState(engine, config, name, owns_engine=False, metrics=engine.metrics,
                           guardrails=guardrails)
    from serving.default_model import resolve_model

    model_dir = resolve_model(config.model, config.model_cache_dir)
    timeline.mark("model files")  # the local folder found, or fetched from object storage
    engine, name = build_async_engine(config, model_dir)
    return ServerState(engine, config, name, owns_engine=True, metrics=engine.metrics, guardrails=guardrails)


class DrainingServer(uvicorn.Server):
    """uvicorn whose first exit signal drains the app before the usual graceful shutdown."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self._drain: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        # SIGHUP reloads the served folder (serving/hot_reload.py); signals reach the main thread only.
        if self.state.owns_engine and threading.current_thread() is threading.main_thread():
            from serving.hot_reload import reload_on_signal

            self._loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload_on_signal(self.state)))
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)  # the app's start-up (the engine's loop), then the bind
        if self.started:
            timeline.ready()

    def handle_exit(self, sig, frame) -> None:
        if self._drain is not None or self._loop is None or self.should_exit:
            super().handle_exit(sig, frame)  # a second signal: go now
            self.force_exit = True
            return
        self.state.admission.begin_drain()
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        admission, timeout = self.state.admission, self.state.config.drain_timeout_s
        log.info("draining: %d requests in flight, up to %.0fs", admission.in_flight, timeout)
        if not await admission.wait_drained(timeout):
            log.warning("drain timeout: %d requests still in flight are cut off", admission.in_flight)
        self.should_exit = True


def make_server(app, state: ServerState, host: str, port: int, log_level: str = "info") -> DrainingServer:
    # The drain has already waited for in-flight requests; what uvicorn still finds after it
    # (a drain that timed out) gets a second, then is cancelled, which aborts it in the engine.
    # proxy_headers=False: X-Forwarded-* is the app's ForwardedHeadersMiddleware's (--trusted-proxies),
    # one rule; uvicorn's own would also believe 127.0.0.1.
    # Slow clients: header and body timers in the protocol, the idle one is uvicorn's keep-alive.
    settings = state.config
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=1, lifespan="on", log_config=None, proxy_headers=False,
                            http=timed_h11_protocol(settings.header_timeout_s, settings.body_timeout_s),
                            timeout_keep_alive=settings.idle_timeout_s)
    return DrainingServer(config, state)


def serve(config: ServerConfig) -> int:
    from serving.app import build_app

    timeline.begin()
    observability.configure(config)
    end_of_imports()
    configure_audit_sinks(config)
    state = build_server_state(config)
    app = build_app(state)
    timeline.mark("app build")
    log.info("serving %s on http://%s:%d", state.model_name, config.host, config.port)
    server = make_server(app, state, config.host, config.port, config.log_level)
    server.run()  # a drained SIGTERM returns here (exit 0); a second signal re-raises itself
    return 0
