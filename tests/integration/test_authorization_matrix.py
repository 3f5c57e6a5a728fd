"""Every route x every kind of caller gives the expected status; every route declares a scope.

Callers: no credentials, a malformed key, an unknown key, a revoked key, an expired OIDC token,
and an API key with each scope. A route answers 401 without valid credentials, 403 without its
scope, and its own success status with it (admin holds every scope); public routes answer all.
"""

from __future__ import annotations

import time

import httpx
import pytest

from serving.auth.guard import DECLARABLE
from serving.auth.principal import ADMIN, AUTHENTICATED, PUBLIC, SCOPES

PROMPT = {"prompt": "hello", "max_tokens": 1, "temperature": 0}
CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 1, "temperature": 0}
# (method, route path) -> (the path to call, JSON body, success status). A new route must be
# added here, or test_every_route_is_in_the_matrix fails.
ROUTES = {
    ("POST", "/v1/completions"): ("/v1/completions", PROMPT, 200),
    ("POST", "/v1/chat/completions"): ("/v1/chat/completions", CHAT, 200),
    ("POST", "/v1/responses"): ("/v1/responses", {"input": "hello", "max_output_tokens": 1, "temperature": 0}, 200),
    # No stored response of that id: a permitted caller gets the 404 (response_not_found), never 401/403.
    ("GET", "/v1/responses/{response_id:str}"): ("/v1/responses/resp_matrix", None, 404),
    ("DELETE", "/v1/responses/{response_id:str}"): ("/v1/responses/resp_matrix", None, 404),
    ("GET", "/v1/models"): ("/v1/models", None, 200),
    ("POST", "/tokenize"): ("/tokenize", {"prompt": "hello"}, 200),
    ("POST", "/detokenize"): ("/detokenize", {"tokens": [1, 2]}, 200),
    ("GET", "/health"): ("/health", None, 200),
    ("GET", "/ready"): ("/ready", None, 200),
    ("GET", "/version"): ("/version", None, 200),
    ("GET", "/metrics"): ("/metrics", None, 200),
    ("GET", "/v1/autoscale"): ("/v1/autoscale", None, 200),
    ("GET", "/debug/requests"): ("/debug/requests", None, 200),
    ("GET", "/auth/whoami"): ("/auth/whoami", None, 200),
    ("GET", "/admin/keys"): ("/admin/keys", None, 200),
    ("POST", "/admin/keys"): ("/admin/keys", {"tenant": "matrix", "scopes": ["read"]}, 201),
    ("DELETE", "/admin/keys/{key_id:str}"): ("/admin/keys/{victim}", None, 200),
    ("GET", "/admin/rate-limits"): ("/admin/rate-limits", None, 200),
    ("PUT", "/admin/rate-limits/{tenant:str}"): ("/admin/rate-limits/matrix", {"rpm": None, "tpm": None}, 200),
    # The matrix server serves no adapters and the folder does not exist: a permitted caller
    # gets the 400 (lora_disabled, model_reload_failed) or 404, never 401/403.
    ("POST", "/v1/load_lora_adapter"): ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nonexistent"}, 400),
    ("POST", "/v1/unload_lora_adapter"): ("/v1/unload_lora_adapter", {"lora_name": "x"}, 400),
    ("GET", "/debug/adapters"): ("/debug/adapters", None, 200),
    ("POST", "/admin/models/reload"): ("/admin/models/reload", {"model_path": "/nonexistent"}, 400),
}


def _handlers(app):
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            for method in sorted(handler.http_methods - {"HEAD", "OPTIONS"}):
                yield method, route.path, handler


def test_every_route_declares_a_scope(secured):
    app = secured.live.server.config.app
    undeclared = [f"{m} {p}" for m, p, h in _handlers(app) if h.opt.get("scope") not in DECLARABLE]
    assert not undeclared, f"routes without a declared scope: {undeclared}"
    assert {h.opt["scope"] for _, _, h in _handlers(app)} == set(DECLARABLE)


def test_every_route_is_in_the_matrix(secured):
    app = secured.live.server.config.app
    # The admin UI's routes answer with pages and redirects: tests/serving/test_ui_pages.py has their matrix.
    ours = {(m, p) for m, p, h in _handlers(app) if not p.startswith(("/schema", "/ui"))}
    assert ours == set(ROUTES)
    schema = [(m, p) for m, p, h in _handlers(app) if p.startswith("/schema")]
    assert schema and all(h.opt["scope"] == PUBLIC for m, p, h in _handlers(app) if p.startswith("/schema"))


@pytest.fixture(scope="module")
def callers(secured, oidc_provider):
    """name -> Authorization header value (None: no header)."""
    keys = {scope: secured.create_key("matrix", [scope])[0] for scope in SCOPES}
    revoked, revoked_id = secured.create_key("matrix", ["admin"])
    assert httpx.delete(f"{secured.url}/admin/keys/{revoked_id}",
                        headers={"authorization": f"Bearer {keys[ADMIN]}"}).status_code == 200
    expired = oidc_provider.client_credentials("short-lived", "short-secret", "urn:tessera")  # lives 2 s
    expired_key, _ = secured.create_key("matrix", ["admin"], expires_in="1s")
    time.sleep(2.5)
    return {
        "none": None,
        "malformed key": "Bearer not-a-key",
        "unknown key": "Bearer tsk_0123456789ab_" + "A" * 43,
        "wrong secret": "Bearer " + keys[ADMIN][: -4] + "AAAA",
        "revoked key": f"Bearer {revoked}",
        "expired key": f"Bearer {expired_key}",
        "expired token": f"Bearer {expired}",
        "not bearer": "Basic dXNlcjpwYXNz",
        **{f"scope {s}": f"Bearer {k}" for s, k in keys.items()},
    }


def _expected(caller: str, needed: str, success: int) -> int:
    if needed == PUBLIC:
        return success
    if not caller.startswith("scope "):
        return 401
    held = caller.removeprefix("scope ")
    return success if needed == AUTHENTICATED or held in (needed, ADMIN) else 403


def test_authorization_matrix(secured, callers):
    app = secured.live.server.config.app
    needed_by_route = {(m, p): h.opt["scope"] for m, p, h in _handlers(app)}
    _, victim = secured.create_key("matrix", ["read"])  # revoked by each permitted DELETE (idempotent)
    failures = []
    with httpx.Client(base_url=secured.url, timeout=60) as client:
        for (method, route), (path, body, success) in ROUTES.items():
            needed = needed_by_route[(method, route)]
            for caller, header in callers.items():
                headers = {"authorization": header} if header else {}
                response = client.request(method, path.format(victim=victim), json=body, headers=headers)
                expected = _expected(caller, needed, success)
                if response.status_code != expected:
                    failures.append(f"{method} {route} as {caller}: {response.status_code} != {expected} "
                                    f"{response.text[:120]}")
                elif expected in (401, 403):
                    error = response.json()["error"]  # OpenAI's body
                    assert set(error) == {"message", "type", "param", "code"} and error["message"]
                    assert error["type"] == "invalid_request_error"
                    assert response.headers["www-authenticate"].startswith("Bearer")
                    if expected == 403:
                        assert error["code"] == "insufficient_scope" and f"`{needed}`" in error["message"]
    assert not failures, "\n".join(failures)


def test_schema_routes_are_public(secured):
    assert httpx.get(f"{secured.url}/schema/openapi.json").status_code == 200


@pytest.mark.parametrize(("caller", "code", "message"), [
    ("none", "missing_credentials", "no credentials"),
    ("unknown key", "invalid_api_key", "not valid"),
    ("wrong secret", "invalid_api_key", "not valid"),
    ("revoked key", "revoked_api_key", "revoked"),
    ("expired key", "expired_api_key", "expired"),
    ("expired token", "invalid_token", "expired"),
])
def test_401_says_why(secured, callers, caller, code, message):
    header = callers[caller]
    response = httpx.get(f"{secured.url}/v1/models", headers={"authorization": header} if header else {})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == code and message in response.json()["error"]["message"]
