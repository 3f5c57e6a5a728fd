"""The Live, Health and Audit pages, their SSE feeds, and the JSON the CLI reads (`tessera top`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime

from litestar import Controller, Request, Response, get, post
from litestar.response import Stream

from ops.audit import audit_event
from serving.auth.guard import needs, principal_of
from serving.auth.principal import ADMIN, READ
from serving.errors import APIError
from serving.middleware import request_record
from serving.ui.audit_view import AuditFilter, parse_time, read_audit
from serving.ui.health import health_snapshot
from serving.ui.render import fragment, page, render, sse

FEED_INTERVAL_S = 0.5
FEED_LIFETIME_S = 600.0  # a feed ends after this and the browser reconnects: no stream lives for ever
AUDIT_ACTIONS = ("auth.failure", "authz.denied", "key.", "key.create", "key.revoke", "model.load", "model.unload",
                 "config.load", "config.change", "admin.")


def sse_stream(events: AsyncIterator[bytes]) -> Stream:
    return Stream(events, media_type="text/event-stream",
                  headers={"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-store",
                           "x-accel-buffering": "no"})


async def _ticks(request: Request, interval_s: float) -> AsyncIterator[None]:
    """A tick per interval until the server drains or the feed has lived its time."""
    server = request.app.state["server"]
    loop = asyncio.get_running_loop()
    end = loop.time() + FEED_LIFETIME_S
    while not server.admission.draining and loop.time() < end:
        yield
        await asyncio.sleep(interval_s)


class LiveController(Controller):
    path = "/ui/live"
    tags = ["Admin UI"]
    include_in_schema = False
    opt = needs(READ)

    @get(operation_id="uiLive")
    async def live(self, request: Request) -> Response:
        return page(request, "live.html", rows=self._rows(request), is_admin=principal_of(request).is_admin)

    @get("/feed", operation_id="uiLiveFeed")
    async def feed(self, request: Request) -> Stream:
        is_admin = principal_of(request).is_admin

        async def events() -> AsyncIterator[bytes]:
            async for _ in _ticks(request, FEED_INTERVAL_S):
                yield sse("rows", render("live_rows.html", rows=self._rows(request), is_admin=is_admin))

        return sse_stream(events())

    @post("/requests/{request_id:str}/abort", operation_id="uiAbortRequest", opt=needs(ADMIN), status_code=200)
    async def abort(self, request: Request, request_id: str) -> Response:
        server = request.app.state["server"]
        generation = server.in_flight.get(request_id)
        if generation is None:
            raise APIError(404, f"no request {request_id!r} is in flight", code="request_not_found")
        for engine_request in generation.requests:
            server.engine.abort(engine_request.request_id)
        caller = principal_of(request)
        audit_event("admin.abort", "success", actor=caller.subject, tenant=generation.record.tenant,
                    key_id=caller.key_id, object=f"request:{request_id}",
                    request_id=request_record(request.scope).request_id,
                    source=request.client.host if request.client else None)
        return fragment("notice.html", message=f"request {request_id} aborted")

    @staticmethod
    def _rows(request: Request):
        principal = principal_of(request)
        # Only the caller's own tenant, unless admin.
        return request.app.state["server"].in_flight.rows(None if principal.is_admin else principal.tenant)


class HealthController(Controller):
    path = "/ui/health"
    tags = ["Admin UI"]
    include_in_schema = False
    opt = needs(READ)

    @get(operation_id="uiHealth")
    async def health(self, request: Request) -> Response:
        return page(request, "health.html", snapshot=health_snapshot(request.app.state["server"]))

    @get("/feed", operation_id="uiHealthFeed")
    async def feed(self, request: Request) -> Stream:
        server = request.app.state["server"]

        async def events() -> AsyncIterator[bytes]:
            async for _ in _ticks(request, FEED_INTERVAL_S):
                yield sse("health", json.dumps(health_snapshot(server)))

        return sse_stream(events())


class AuditController(Controller):
    path = "/ui/audit"
    tags = ["Admin UI"]
    include_in_schema = False
    opt = needs(ADMIN)

    @get(operation_id="uiAudit")
    async def audit(self, request: Request, action: str = "", tenant: str = "", since: str = "",
                    until: str = "") -> Response:
        where = AuditFilter(action.strip(), tenant.strip(), _when(since, "since"), _when(until, "until"))
        path = request.app.state["server"].config.audit_file
        lines = read_audit(path, where)
        return page(request, "audit.html", lines=lines, audit_file=path, actions=AUDIT_ACTIONS,
                    query={"action": action, "tenant": tenant, "since": since, "until": until})


def _when(text: str, name: str) -> datetime | None:
    if not text.strip():
        return None
    when = parse_time(text.strip())
    if when is None:
        raise APIError(400, f"{name} must be a date and time such as 2025-01-31T14:00 (UTC), got {text[:40]!r}",
                       param=name)
    return when


class UIApiController(Controller):
    """JSON for the CLI: `tessera top` reads the Health page's figures here."""

    path = "/ui/api"
    tags = ["Admin UI"]
    include_in_schema = False
    opt = needs(READ)

    @get("/health", operation_id="uiApiHealth")
    async def health(self, request: Request) -> dict:
        return health_snapshot(request.app.state["server"])
