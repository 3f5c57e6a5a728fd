"""Logging in to the UI (an API key, or OIDC with PKCE) and out. The credentials live in the
server-side session; the session id changes at each login."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from litestar import Controller, Request, Response, get, post
from litestar.params import Parameter
from litestar.response import Redirect

from serving.auth.guard import needs
from serving.auth.principal import AUTHENTICATED, PUBLIC
from serving.errors import APIError
from serving.ui.oidc_web import LoginFailed
from serving.ui.render import page
from serving.ui.security import CSRF_FIELD, replace_session, session_of

HOME = "/ui/"
MAX_KEY_CHARS = 4096


def safe_next(target: str | None) -> str:
    """Only a page of this UI: never another site (`//evil`, `/ui/../x`, a URL with a scheme)."""
    if not target or not target.startswith("/ui/") or "//" in target or "\\" in target or ".." in target:
        return HOME
    return target


def login_url(next_page: str) -> str:
    return f"/ui/login?next={quote(safe_next(next_page), safe='/')}"


class LoginController(Controller):
    path = "/ui"
    tags = ["Admin UI"]
    include_in_schema = False

    @get("/login", operation_id="uiLogin", opt=needs(PUBLIC))
    async def login_page(self, request: Request, next: str | None = None) -> Response:  # noqa: A002
        return _login_page(request, safe_next(next))

    @post("/login/key", operation_id="uiLoginWithKey", opt=needs(PUBLIC), status_code=303)
    async def login_with_key(self, request: Request) -> Response:
        form = await request.form()
        key, next_page = str(form.get("key") or "").strip(), safe_next(form.get("next"))
        if not key or len(key) > MAX_KEY_CHARS:
            return _login_page(request, next_page, "enter an API key", status=400)
        access = request.app.state["access"]
        try:
            await access.authenticate(f"Bearer {key}")
        except APIError as e:
            return _login_page(request, next_page, e.message, status=e.status)
        _log_in(request, f"Bearer {key}", None)
        return Redirect(next_page, status_code=303)

    @get("/login/oidc", operation_id="uiLoginWithOidc", opt=needs(PUBLIC))
    async def login_with_oidc(self, request: Request, next: str | None = None) -> Response:  # noqa: A002
        web_login = request.app.state["ui"].oidc
        if web_login is None:
            return _login_page(request, safe_next(next), "this server has no OIDC login (ui_oidc_client_id)",
                               status=404)
        redirect_uri = str(request.base_url).rstrip("/") + "/ui/login/callback"
        try:
            url = await web_login.start(session_of(request), redirect_uri, safe_next(next))
        except LoginFailed as e:
            return _login_page(request, safe_next(next), str(e), status=502)
        return Redirect(url, status_code=303)

    @get("/login/callback", operation_id="uiLoginCallback", opt=needs(PUBLIC))
    async def login_callback(self, request: Request, code: str | None = None,
                             oidc_state: Annotated[str | None, Parameter(query="state")] = None,
                             error: str | None = None) -> Response:
        web_login = request.app.state["ui"].oidc
        if web_login is None:
            return _login_page(request, HOME, "this server has no OIDC login", status=404)
        session = session_of(request)
        next_page = (session.login or {}).get("next", HOME)
        try:
            token, expires_at, next_page = await web_login.finish(session, code, oidc_state, error)
            await request.app.state["access"].authenticate(f"Bearer {token}")
        except LoginFailed as e:
            return _login_page(request, next_page, str(e), status=400)
        except APIError as e:  # the provider's token is not one this server accepts (audience, tenant)
            return _login_page(request, next_page, f"the server refused the provider's token: {e.message}",
                               status=e.status)
        _log_in(request, f"Bearer {token}", expires_at)
        return Redirect(next_page, status_code=303)

    @post("/logout", operation_id="uiLogout", opt=needs(AUTHENTICATED), status_code=303)
    async def logout(self, request: Request) -> Response:
        ui = request.app.state["ui"]
        ui.sessions.drop(session_of(request))
        replace_session(request, ui.sessions.new())
        return Redirect("/ui/login", status_code=303)

    @get("/", operation_id="uiHome", opt=needs(AUTHENTICATED))
    async def home(self, request: Request) -> Response:
        from serving.ui.render import PAGES, principal_or_none

        principal = principal_or_none(request)
        first = next((path for _, path, scope in PAGES if principal is not None and principal.has(scope)), None)
        if first is None:
            return page(request, "error.html", status=403, title="No pages",
                        message="your credentials hold no scope that any page of this UI needs")
        return Redirect(first, status_code=303)


def _log_in(request: Request, authorization: str, expires_at: float | None) -> None:
    ui = request.app.state["ui"]
    session = ui.sessions.rotate(session_of(request))
    session.authorization, session.expires_at = authorization, expires_at
    replace_session(request, session)


def _login_page(request: Request, next_page: str, error: str | None = None, status: int = 200) -> Response:
    web_login = request.app.state["ui"].oidc
    return page(request, "login.html", status=status, next_page=next_page, error=error, csrf_field=CSRF_FIELD,
                oidc_issuer=web_login.issuer if web_login else None)
