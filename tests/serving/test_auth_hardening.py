"""Tokens the issue found answering 500 before any credential check, through a live server with
auth on: each is a 401 or a 403 now, and every authentication failure is audited."""

from __future__ import annotations

import io
import json

import httpx
import pytest

from serving.app import create_app
from serving.auth.access import build_access
from serving.auth.oidc import TokenPolicy, TokenVerifier
from serving.config import ServerConfig
from tests.helpers.fake_issuer import ISSUER, FakeIssuer, claims_payload
from tests.serving.conftest import SERVER, assert_error, start_server


@pytest.fixture(scope="module")
def secured(engine, log_stream):
    from ops.audit import configure_audit, reset_audit

    issuer = FakeIssuer()
    audit = io.StringIO()
    configure_audit(stream=audit)
    config = ServerConfig(**SERVER, auth="on", oidc_issuer=ISSUER, oidc_audience="tessera")
    access = build_access(config, {})
    access.authenticator.verifier = TokenVerifier([TokenPolicy(ISSUER, "tessera", leeway_s=0)],
                                                  transport=httpx.MockTransport(issuer.handler))
    live = start_server(create_app(engine, config, access=access))
    live.issuer, live.audit = issuer, audit
    yield live
    live.stop()
    reset_audit()


def call(live, path: str, token: str, request_id: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}", "x-request-id": request_id}
    if path == "/auth/whoami":
        return httpx.get(live.url + path, headers=headers, timeout=30)
    return httpx.post(live.url + path, json={"prompt": "Hi", "max_tokens": 1}, headers=headers, timeout=30)


def test_an_integer_audience_in_a_badly_signed_token_is_a_401_and_audited(secured):
    from cryptography.hazmat.primitives.asymmetric import rsa

    impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = secured.issuer.sign_raw(claims_payload({"aud": 7}, {}), key=impostor)
    response = call(secured, "/v1/completions", token, "int-aud")
    assert_error(response, 401, code="invalid_token")
    lines = [json.loads(x) for x in secured.audit.getvalue().splitlines()]
    assert [(a["action"], a["reason"]) for a in lines if a["request_id"] == "int-aud"] == [
        ("auth.failure", "invalid_token")]


def test_nested_scopes_in_a_valid_token_grant_nothing(secured):
    token = secured.issuer.sign_raw(claims_payload({"scope": [["admin"]]}, {}))
    assert_error(call(secured, "/v1/completions", token, "nested-scope"), 403, code="insufficient_scope")
    whoami = call(secured, "/auth/whoami", token, "nested-whoami")
    assert whoami.status_code == 200 and whoami.json()["scopes"] == []


@pytest.mark.parametrize("claims", [{"exp": float("inf")}, {"sub": ["a"]}, {"iss": 5}],
                         ids=["exp-infinity", "sub-a-list", "iss-a-number"])
def test_odd_claims_in_valid_tokens_are_401(secured, claims):
    token = secured.issuer.sign_raw(claims_payload(claims, {}))
    assert_error(call(secured, "/v1/completions", token, "odd"), 401, code="invalid_token")
