"""GET /debug/requests: recent requests' token timings (text only with prompt logging on); a caller
sees its own tenant's requests only, unless it is admin."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, get
from litestar.params import Parameter

from serving.auth.guard import needs, principal_of
from serving.auth.principal import READ
from serving.protocol.admin import RecentRequests
from serving.state import ServerState


class DebugController(Controller):
    path = "/debug"
    tags = ["Operations"]
    opt = needs(READ)

    @get("/requests", operation_id="recentRequests", summary="Recent requests, newest last, with token timings")
    async def recent_requests(
        self, request: Request, server: ServerState, limit: Annotated[int | None, Parameter(ge=1, le=10_000)] = None
    ) -> RecentRequests:
        caller = principal_of(request)
        items = server.recent.items()
        if not caller.is_admin:
            items = [r for r in items if r.tenant == caller.tenant]
        return RecentRequests(items[-limit:] if limit else items, server.recent.capacity)
