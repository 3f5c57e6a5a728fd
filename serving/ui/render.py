"""Server-side HTML: Jinja templates (autoescaped) and the SSE framing of HTML fragments."""

from __future__ import annotations

import json
from functools import lru_cache

import jinja2
from litestar import MediaType, Request, Response

from serving.auth.guard import PRINCIPAL_KEY
from serving.auth.principal import ADMIN, GENERATE, READ, Principal
from serving.ui.security import session_of

PAGES = (  # (title, path, scope): the navigation, each link shown to callers holding its scope
    ("Live", "/ui/live", READ),
    ("Playground", "/ui/playground", GENERATE),
    ("Playback", "/ui/playback", READ),
    ("Health", "/ui/health", READ),
    ("Audit", "/ui/audit", ADMIN),
)
HTMX_CONFIG = json.dumps({
    "includeIndicatorStyles": False, "allowEval": False, "allowScriptTags": False, "selfRequestsOnly": True,
    # 4xx and 5xx fragments are swapped like others (they say what went wrong), not logged as errors.
    "responseHandling": [{"code": "204", "swap": False}, {"code": "[2345]..", "swap": True, "error": False}],
})


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("serving.ui", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["ago"] = lambda seconds: f"{seconds:.1f} s"
    return env


def principal_or_none(request: Request) -> Principal | None:
    return request.scope.get("state", {}).get(PRINCIPAL_KEY)


def page(request: Request, template: str, status: int = 200, **context) -> Response:
    principal = principal_or_none(request)
    nav = [(title, path) for title, path, scope in PAGES if principal is not None and principal.has(scope)]
    html = environment().get_template(template).render(
        principal=principal, nav=nav, csrf_token=session_of(request).csrf_token, htmx_config=HTMX_CONFIG,
        auth_enabled=request.app.state["access"].enabled, current=request.url.path, **context)
    return Response(html, status_code=status, media_type=MediaType.HTML)


def fragment(template: str, status: int = 200, **context) -> Response:
    return Response(render(template, **context), status_code=status, media_type=MediaType.HTML)


def render(template: str, **context) -> str:
    return environment().get_template(template).render(**context)


def sse(event: str, data: str) -> bytes:
    """One server-sent event; a multi-line payload becomes several `data:` lines (joined again
    with newlines by the browser)."""
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"event: {event}\n{lines}\n".encode()
