"""GET /debug/requests: recent requests' token timings (text only with prompt logging on)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get
from litestar.params import Parameter

from serving.protocol.admin import RecentRequests
from serving.state import ServerState


class DebugController(Controller):
    path = "/debug"
    tags = ["Operations"]

    @get("/requests", operation_id="recentRequests", summary="Recent requests, newest last, with token timings")
    async def recent_requests(
        self, server: ServerState, limit: Annotated[int | None, Parameter(ge=1, le=10_000)] = None
    ) -> RecentRequests:
        return RecentRequests(server.recent.items(limit), server.recent.capacity)
