"""Every route declares the scope it needs (`opt={"scope": ...}`); one guard checks it.

    @get("/v1/models", opt=needs(READ))

`public` routes need nothing (liveness and readiness probes), `authenticated` ones any valid
credentials, the others that scope (admin holds all). A route that declares nothing is
refused to everyone but admins, and a test fails the build for it.

`AccessMiddleware` sits inside the request middleware: it adds the caller's
`x-ratelimit-*` headers to the response and, once the response is complete, charges the
request's prompt and completion tokens to the caller's token buckets.
"""

from __future__ import annotations

import asyncio
import logging

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.types import ASGIApp, Receive, Scope, Send

from ops.audit import audit_event
from serving.auth.access import Access
from serving.auth.principal import ADMIN, AUTHENTICATED, PUBLIC, SCOPES, Principal
from serving.errors import APIError
from serving.middleware import RECORD_KEY

log = logging.getLogger(__name__)
PRINCIPAL_KEY = "tessera.principal"
DECISION_KEY = "tessera.ratelimit"
DECLARABLE = (PUBLIC, AUTHENTICATED, *SCOPES)


def needs(scope: str) -> dict[str, str]:
    """A route's `opt`: the scope it needs."""
    if scope not in DECLARABLE:
        raise ValueError(f"scope {scope!r} is not one of {', '.join(DECLARABLE)}")
    return {"scope": scope}


def principal_of(connection: ASGIConnection | Scope) -> Principal:
    scope = connection.scope if isinstance(connection, ASGIConnection) else connection
    return scope.get("state", {})[PRINCIPAL_KEY]


async def authorize(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """The app's guard: authenticate, check the declared scope, take from the rate limits."""
    access: Access = connection.app.state["access"]
    needed = handler.opt.get("scope")
    if needed == PUBLIC:
        return
    if needed not in DECLARABLE:
        log.error("route %s declares no scope; only admins may call it", connection.url.path)
        needed = ADMIN
    state = connection.scope.setdefault("state", {})
    record = state.get(RECORD_KEY)
    where = dict(request_id=record.request_id if record else None,
                 source=connection.client.host if connection.client else None, object=connection.url.path)
    try:
        principal = await access.authenticate(connection.headers.get("authorization"))
    except APIError as e:  # 401, or 503 when the store or issuer cannot be reached: both audited
        key_id = _presented_key_id(connection.headers.get("authorization"))
        audit_event("auth.failure", "failure", key_id=key_id, reason=e.code, method=connection.method, **where)
        raise
    state[PRINCIPAL_KEY] = principal
    if record is not None:
        record.tenant = principal.tenant
    if needed != AUTHENTICATED and not principal.has(needed):
        audit_event("authz.denied", "denied", actor=principal.subject, tenant=principal.tenant,
                    key_id=principal.key_id, required_scope=needed, method=connection.method, **where)
        held = ", ".join(sorted(principal.scopes)) or "none"
        raise APIError(403, f"this route needs the scope `{needed}`; the caller has: {held}",
                       code="insufficient_scope",
                       headers={"www-authenticate": f'Bearer error="insufficient_scope", scope="{needed}"'})
    if needed == AUTHENTICATED:
        return  # /auth/whoami: the CLI's check before each command does not spend the caller's requests
    decision = await access.admit(principal)
    if decision is not None:
        state[DECISION_KEY] = decision


def _presented_key_id(authorization: str | None) -> str | None:
    from serving.auth.keys import split_key

    credential = (authorization or "").partition(" ")[2].strip()
    parts = split_key(credential)
    return parts[0] if parts else None


class AccessMiddleware:
    def __init__(self, app: ASGIApp, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        status = 500

        async def send_with_limits(message) -> None:
            nonlocal status
            decision = state.get(DECISION_KEY)
            if message["type"] == "http.response.start":
                status = message["status"]
            if message["type"] == "http.response.start" and decision is not None:
                known = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in decision.headers().items()
                         if k.encode() not in known and k != "retry-after"]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            await self.app(scope, receive, send_with_limits)
        finally:
            principal, record = state.get(PRINCIPAL_KEY), state.get(RECORD_KEY)
            # Tokens the engine processed: a request refused before it ran (4xx) used none.
            if principal is not None and record is not None and record.model is not None and (
                    status < 400 or record.completion_tokens > 0):
                try:
                    # Shielded: a client that went away still used its tokens.
                    await asyncio.shield(self.access.charge(principal, record.prompt_tokens
                                                            + record.completion_tokens))
                except Exception:  # noqa: BLE001 - charging never fails a response already sent
                    log.exception("charging tokens of request %s failed", record.request_id)
