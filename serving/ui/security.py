"""What every /ui response gets: the session cookie, its credentials for the app's guard, the
Content-Security-Policy and friends, and CSRF checks on every unsafe method.

The UI's pages go through the same guard as the API: `UIMiddleware` (a router middleware, so
inside the app's request and access middleware and before any guard) puts the session's
`Authorization` on the request when the browser sent none. A caller that sends its own header
(the CLI, curl) is served as on the API, and is not asked for a CSRF token: a cross-site page
cannot set that header, while the browser attaches the cookie by itself, which is what the
token guards against.
"""

from __future__ import annotations

import time

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.types import ASGIApp, Empty, Receive, Scope, Send
from litestar.utils.scope.state import ScopeState

from serving.errors import APIError
from serving.ui.sessions import COOKIE, COOKIE_PATH, Session

SESSION_KEY = "tessera.ui.session"
COOKIE_AUTH_KEY = "tessera.ui.cookie_auth"  # the credentials came from the session, not the client
CSRF_FIELD = "_csrf"
CSRF_HEADER = "x-csrf-token"
STATIC_PREFIX = "/ui/static/"

# Scripts and styles only from files this server serves: no inline script, no inline style, no eval.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


def session_of(connection: ASGIConnection | Scope) -> Session:
    scope = connection.scope if isinstance(connection, ASGIConnection) else connection
    return scope["state"][SESSION_KEY]


def replace_session(connection: ASGIConnection, session: Session) -> None:
    """After a login or logout: the response sets the new session's cookie."""
    connection.scope["state"][SESSION_KEY] = session


class UIMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith(STATIC_PREFIX):
            await self.app(scope, receive, self._with_headers(scope, send, None))
            return
        state = scope.setdefault("state", {})
        presented = _cookie(scope, COOKIE)
        # Read from the app at each call: Litestar copies a router's middleware arguments.
        sessions = scope["litestar_app"].state["ui"].sessions
        session = sessions.get(presented)
        if session is not None and session.credentials_expired(time.time()):
            session.authorization = session.expires_at = None  # the token ran out: log in again
        if session is None:
            session = sessions.new()
        state[SESSION_KEY] = session
        headers = list(scope.get("headers", ()))
        if session.authorization and not any(name == b"authorization" for name, _ in headers):
            scope["headers"] = [*headers, (b"authorization", session.authorization.encode("latin-1"))]
            ScopeState.from_scope(scope).headers = Empty  # Litestar caches the parsed headers per request
            state[COOKIE_AUTH_KEY] = True
        elif not any(name == b"authorization" for name, _ in headers):
            state[COOKIE_AUTH_KEY] = True  # anonymous: the browser's session is all there is
        await self.app(scope, receive, self._with_headers(scope, send, presented))

    def _with_headers(self, scope: Scope, send: Send, presented: str | None) -> Send:
        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                extra = list(SECURITY_HEADERS)
                session = scope.get("state", {}).get(SESSION_KEY)
                if session is not None:
                    extra.append((b"cache-control", b"no-store"))
                    if session.id != presented:
                        extra.append((b"set-cookie", _cookie_header(scope, session).encode("latin-1")))
                known = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *[(k, v) for k, v in extra if k not in known or k == b"set-cookie"]]
            await send(message)

        return send_with_headers


def _cookie_header(scope: Scope, session: Session) -> str:
    secure = "; Secure" if scope.get("scheme") == "https" else ""
    # Lax, not Strict: the OIDC provider's redirect back to /ui/login/callback is a cross-site
    # navigation that must carry the cookie holding the login's state and PKCE verifier.
    return f"{COOKIE}={session.id}; Path={COOKIE_PATH}; HttpOnly; SameSite=Lax{secure}"


def _cookie(scope: Scope, name: str) -> str | None:
    for header, value in scope.get("headers", ()):
        if header != b"cookie":
            continue
        for part in value.decode("latin-1").split(";"):
            key, _, val = part.strip().partition("=")
            if key == name:
                return val
    return None


async def check_csrf(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """The UI router's guard: an unsafe request that rides on the session cookie carries the
    session's token (form field `_csrf`, or the `X-CSRF-Token` header htmx sends)."""
    if connection.scope["method"] in ("GET", "HEAD", "OPTIONS"):
        return
    state = connection.scope["state"]
    if not state.get(COOKIE_AUTH_KEY):
        return
    presented = connection.headers.get(CSRF_HEADER)
    if presented is None:
        request = connection if isinstance(connection, Request) else Request(connection.scope, connection.receive)
        form = await request.form()  # cached in the connection: the handler reads it again for free
        presented = form.get(CSRF_FIELD)
    if not session_of(connection).csrf_matches(presented if isinstance(presented, str) else None):
        raise APIError(403, "the form's CSRF token is missing or does not match this session; reload the page "
                            "and submit it again", code="csrf_failed")
