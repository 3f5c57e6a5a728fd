"""Per request: an id (X-Request-Id), the HTTP span, one access line, the /debug ring."""

from __future__ import annotations

import logging
import re
import uuid

from litestar.types import ASGIApp, Receive, Scope, Send

from serving import observability
from serving.records import RequestRecord
from serving.state import ServerState

log = logging.getLogger(__name__)
RECORD_KEY = "tessera.record"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestMiddleware:
    def __init__(self, app: ASGIApp, server: ServerState):
        self.app, self.server = app, server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        method, path = scope["method"], scope["path"]
        record = RequestRecord(request_id, endpoint=path)
        scope.setdefault("state", {})[RECORD_KEY] = record
        span = observability.start_http_span(f"{method} {path}", {
            "http.request.method": method, "url.path": path, "tessera.request_id": request_id,
        })
        status = 500

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            record.finish(status)
            record.release()
            self.server.in_flight.discard(request_id)
            try:
                if record.model is not None:  # a generation request
                    self.server.recent.add(record)
                observability.end_http_span(span, record)
                observability.access_log(record, method, path)
            except Exception:  # noqa: BLE001 - observability never fails a request
                log.exception("recording request %s failed", request_id)


def request_record(scope: Scope) -> RequestRecord:
    return scope["state"][RECORD_KEY]


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _CLIENT_ID.match(text):
                return text
    return uuid.uuid4().hex
