"""The admin web UI under /ui: server-rendered pages (Jinja), htmx with its SSE extension and
Chart.js served from static/vendor, behind the API's own authentication and scopes.

`ui_route_handlers(server)` gives the app its /ui router (session middleware, CSRF guard,
HTML error pages) and the static files; `UIState` is what the pages share.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from litestar import Request, Response, Router
from litestar.exceptions import HTTPException, ValidationException
from litestar.middleware import DefineMiddleware
from litestar.response import Redirect
from litestar.static_files import create_static_files_router

from serving.auth.guard import needs
from serving.auth.principal import PUBLIC
from serving.errors import EXCEPTION_HANDLERS, APIError
from serving.ui.login import LoginController, login_url
from serving.ui.monitor import AuditController, HealthController, LiveController, UIApiController
from serving.ui.oidc_web import WebLogin
from serving.ui.player import PlaybackController
from serving.ui.playground import PlaygroundController, TranscriptsApiController
from serving.ui.security import UIMiddleware, check_csrf
from serving.ui.sessions import SessionStore
from serving.ui.transcripts import TranscriptStore

STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class UIState:
    sessions: SessionStore
    transcripts: TranscriptStore
    oidc: WebLogin | None


def build_ui_state(config) -> UIState:
    oidc = None
    if config.ui_oidc_client_id and config.oidc_issuer:
        oidc = WebLogin(config.oidc_issuer, config.ui_oidc_client_id, config.ui_oidc_scopes, config.ui_oidc_resource)
    return UIState(SessionStore(), TranscriptStore(config.ui_transcripts_dir), oidc)


def ui_route_handlers() -> list:
    pages = Router("/", route_handlers=[LoginController, LiveController, HealthController, AuditController,
                                        UIApiController, PlaygroundController, TranscriptsApiController,
                                        PlaybackController],
                   middleware=[DefineMiddleware(UIMiddleware)], guards=[check_csrf],
                   exception_handlers={APIError: _api_error, HTTPException: _http_error,
                                       ValidationException: _http_error, Exception: _unexpected},
                   include_in_schema=False)
    static = create_static_files_router("/ui/static", directories=[STATIC_DIR], opt=needs(PUBLIC),
                                        include_in_schema=False, send_as_attachment=False,
                                        middleware=[DefineMiddleware(UIMiddleware)])
    return [pages, static]


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/ui/api/")


def _api_error(request: Request, exc: APIError) -> Response:
    if _wants_json(request):
        return exc.to_response()
    if exc.status == 401:  # not logged in (or no longer): to the login page, then back here
        target = login_url(request.url.path)
        if request.headers.get("hx-request"):
            return Response(b"", status_code=200, headers={"hx-redirect": target})
        return Redirect(target, status_code=303)
    from serving.ui.render import page

    title = {403: "Not allowed", 404: "Not found"}.get(exc.status, "Cannot do that")
    template = "error_fragment.html" if request.headers.get("hx-request") else "error.html"
    return page(request, template, status=exc.status, title=title, message=exc.message)


def _http_error(request: Request, exc: HTTPException) -> Response:
    if _wants_json(request):
        handler = EXCEPTION_HANDLERS[ValidationException if isinstance(exc, ValidationException) else HTTPException]
        return handler(request, exc)
    return _api_error(request, APIError(exc.status_code, exc.detail or "the request is not valid"))


def _unexpected(request: Request, exc: Exception) -> Response:
    EXCEPTION_HANDLERS[Exception](request, exc)  # logs it
    return _api_error(request, APIError(500, "internal server error"))
