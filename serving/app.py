"""`create_app()`: the Litestar app; `TesseraPlugin` wires routes, OpenAPI, errors, limits, lifecycle."""

from __future__ import annotations

import gc
import logging

import anyio
from litestar import Litestar, Router
from litestar.config.app import AppConfig
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.plugins import InitPluginProtocol

from ops.audit import audit_event

from runtime.engine_client import EngineClient
from serving.auth.access import Access, build_access
from serving.auth.guard import AccessMiddleware, authorize, needs
from serving.auth.principal import PUBLIC
from serving.body import BodyRequest
from serving.config import ServerConfig
from serving.errors import EXCEPTION_HANDLERS
from serving.forwarded import ForwardedHeadersMiddleware
from serving.middleware import RequestMiddleware
from serving.routes.adapters import AdapterDebugController, LoraAdaptersController, ModelReloadController
from serving.routes.admin import AdminKeysController, AdminRateLimitsController, AuthController
from serving.routes.chat import ChatController
from serving.routes.completions import CompletionsController
from serving.routes.debug import DebugController
from serving.routes.health import HealthController, _tessera_version
from serving.routes.models import ModelsController
from serving.routes.responses import ResponsesController
from serving.routes.tokenize import TokenizeController
from serving.state import ServerState

log = logging.getLogger(__name__)


def create_app(engine: EngineClient | None = None, config: ServerConfig | None = None,
               access: Access | None = None) -> Litestar:
    """The app around `engine`; without one, builds the engine `config` describes (and owns it).
    `access` (auth and rate limits) defaults to what `config` and the environment describe."""
    from serving.server import build_server_state

    config = config or ServerConfig.from_sources()
    return build_app(build_server_state(config, engine), access)


def build_app(server: ServerState, access: Access | None = None) -> Litestar:
    # The body limit is a constructor argument: Litestar's router does not read it back from a plugin.
    # logging_config=None: Litestar would otherwise replace the root logger's handlers with its own.
    return Litestar(plugins=[TesseraPlugin(server, access)], request_max_body_size=server.config.max_body_bytes,
                    logging_config=None)


class TesseraPlugin(InitPluginProtocol):
    def __init__(self, server: ServerState, access: Access | None = None):
        self.server = server
        self.access = access or build_access(server.config)

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        self._configure_routes(app_config)
        self._configure_bodies(app_config)
        self._configure_access(app_config)
        self._configure_openapi(app_config)
        self._configure_errors(app_config)
        self._configure_lifecycle(app_config)
        return app_config

    def _configure_routes(self, app_config: AppConfig) -> None:
        server = self.server
        app_config.route_handlers += [CompletionsController, ChatController, ResponsesController, ModelsController,
                                      TokenizeController,
                                      HealthController, DebugController, AdminKeysController, AdminRateLimitsController,
                                      AuthController, LoraAdaptersController, AdapterDebugController,
                                      ModelReloadController]
        if server.config.ui:
            from serving.ui import build_ui_state, ui_route_handlers

            app_config.route_handlers += ui_route_handlers()
            app_config.state["ui"] = build_ui_state(server.config)
        app_config.dependencies["server"] = Provide(lambda: server, use_cache=True, sync_to_thread=False)
        # First: everything after it (request records, rate limits, audit) sees the real client.
        app_config.middleware.insert(0, DefineMiddleware(ForwardedHeadersMiddleware,
                                                         trusted=server.config.trusted_proxies))
        app_config.middleware.append(DefineMiddleware(RequestMiddleware, server=server))
        app_config.state["server"] = server

    def _configure_bodies(self, app_config: AppConfig) -> None:
        """Every handler's `data` through serving/body.py: JSON only, bounded, strictly typed."""
        app_config.request_class = BodyRequest

    def _configure_access(self, app_config: AppConfig) -> None:
        """The guard checks every route's declared scope; the middleware adds rate-limit headers
        and charges tokens (inside the request middleware, so it sees the request's record)."""
        app_config.guards.append(authorize)
        app_config.middleware.append(DefineMiddleware(AccessMiddleware, access=self.access))
        app_config.state["access"] = self.access

    def _configure_openapi(self, app_config: AppConfig) -> None:
        app_config.openapi_config = OpenAPIConfig(
            title="Tessera", version=_tessera_version(), use_handler_docstrings=False,
            openapi_router=Router("/schema", route_handlers=[], opt=needs(PUBLIC), include_in_schema=False),
            description="An OpenAI-compatible LLM inference server on JAX/XLA.",
        )

    def _configure_errors(self, app_config: AppConfig) -> None:
        app_config.exception_handlers.update(EXCEPTION_HANDLERS)

    def _configure_lifecycle(self, app_config: AppConfig) -> None:
        app_config.on_startup.append(self._start)
        app_config.on_shutdown.append(self._stop)

    async def _start(self) -> None:
        # What start-up made (modules, the model's structures) lives as long as the process:
        # frozen, it is left out of the full collections that stop every request, which walked
        # it for 0.1-0.3 s at a time here (measured beside the 4 MiB prompt test).
        gc.collect()
        gc.freeze()
        self.server.engine.start()
        if self.server.owns_engine:  # `tessera serve`: the tokenizer workers spawn now, not on the first request
            self.server.tokenizer_pool.start()
        audit_event("model.load", "success", actor="system", object=f"model:{self.server.model_name}")

    async def _stop(self) -> None:
        """Stop intake, let in-flight requests finish (up to the drain timeout), stop an owned engine."""
        server = self.server
        server.admission.begin_drain()
        if not await server.admission.wait_drained(server.config.drain_timeout_s):
            log.warning("drain timeout: %d requests still in flight", server.admission.in_flight)
        if server.owns_engine:
            await anyio.to_thread.run_sync(server.engine.shutdown)
            audit_event("model.unload", "success", actor="system", object=f"model:{server.model_name}")
        await self.access.close()
