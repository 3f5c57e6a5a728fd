"""OpenID Connect against a real provider (oidc-provider on loopback): `tessera login` with PKCE
and with the device flow, completed programmatically; refresh; workload tokens; and the
tokens that must be refused (expired, wrong audience, unknown signing key, forged)."""

from __future__ import annotations

import json
import os
import re
import stat
import time
from urllib.parse import parse_qs, urljoin, urlparse

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from serving import admin_client
from serving.auth.login import login
from serving.auth.tokens import current_access_token


@pytest.fixture
def token_cache(tmp_path, monkeypatch):
    path = tmp_path / "config" / "tokens.json"
    monkeypatch.setenv("TESSERA_TOKEN_CACHE", str(path))
    monkeypatch.delenv("TESSERA_API_KEY", raising=False)
    return path


def complete_interaction(client: httpx.Client, response: httpx.Response, account: str) -> httpx.Response:
    """Log in as `account` and grant what is asked, the way a person would in the browser."""
    for _ in range(4):
        if not urlparse(str(response.url)).path.startswith("/interaction/"):
            return response
        prompt = response.json()["prompt"]
        action = "login" if prompt == "login" else "confirm"
        response = client.post(f"{response.url}/{action}", data={"login": account} if action == "login" else {})
    raise AssertionError(f"the interaction did not finish: {response.url}")


def browser(account: str, seen: list[str]):
    """An `open_url` for `tessera login`: follows the authorization URL through the provider's
    login and consent to the CLI's loopback redirect."""
    def open_url(url: str) -> None:
        seen.append(url)
        with httpx.Client(follow_redirects=True, timeout=30) as client:
            final = complete_interaction(client, client.get(url), account)
            assert "logged in" in final.text, final.text
    return open_url


def device_user(account: str, seen: list[str]):
    """An `open_url` for the device flow: the person opens the verification URL on another
    device, submits the provider's forms (the code, then its confirmation), logs in and consents."""
    def open_url(url: str) -> None:
        seen.append(url)
        with httpx.Client(follow_redirects=True, timeout=30) as client:
            response = client.get(url)
            for _ in range(3):
                form = re.search(r'<form[^>]*action="([^"]+)"[^>]*>(.*?)</form>', response.text, re.S)
                if form is None:
                    break
                fields = dict(re.findall(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', form.group(2)))
                response = client.post(urljoin(str(response.url), form.group(1)), data=fields)
            final = complete_interaction(client, response, account)
            assert final.status_code == 200 and "error" not in final.text.lower(), final.text
    return open_url


def test_pkce_login_caches_tokens_the_server_accepts(secured, token_cache, capsys):
    seen: list[str] = []
    entry = login(secured.issuer, "tessera-cli", flow="browser", open_url=browser("alice@acme", seen))
    query = parse_qs(urlparse(seen[0]).query)
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
    redirect = urlparse(query["redirect_uri"][0])
    assert (redirect.hostname, redirect.path) == ("127.0.0.1", "/callback") and redirect.port > 0
    assert stat.S_IMODE(os.stat(token_cache).st_mode) == 0o600
    cached = json.loads(token_cache.read_text())["tokens"][f"{secured.issuer}|tessera-cli"]
    assert cached["refresh_token"] and cached["access_token"] == entry["access_token"]
    claims = jwt.decode(entry["access_token"], options={"verify_signature": False})
    assert (claims["aud"], claims["tenant"], claims["sub"]) == ("tessera", "acme", "alice@acme")
    assert set(claims["scope"].split()) == {"generate", "read"}

    me = admin_client.whoami(secured.url)  # the client commands send the cached token
    assert (me["kind"], me["tenant"], me["subject"], sorted(me["scopes"])) == (
        "oidc", "acme", "alice@acme", ["generate", "read"])
    with pytest.raises(admin_client.ClientError, match="needs the scope `admin`.*have: generate, read"):
        admin_client.require_scope(secured.url, "keys list")


def test_refresh_when_the_access_token_is_due(secured, token_cache):
    login(secured.issuer, "tessera-cli", flow="browser", open_url=browser("bob@beta", []))
    cache = json.loads(token_cache.read_text())
    name = cache["current"]
    old = cache["tokens"][name]
    cache["tokens"][name]["expires_at"] = time.time() - 1  # as if an hour had passed
    token_cache.write_text(json.dumps(cache))
    fresh = current_access_token()
    assert fresh != old["access_token"]
    renewed = json.loads(token_cache.read_text())["tokens"][name]
    assert renewed["expires_at"] > time.time() + 300 and renewed["refresh_token"]
    response = httpx.get(f"{secured.url}/auth/whoami", headers={"authorization": f"Bearer {fresh}"})
    assert response.status_code == 200 and response.json()["tenant"] == "beta"


def test_device_flow_login(secured, token_cache):
    seen: list[str] = []
    entry = login(secured.issuer, "tessera-cli", flow="device", open_url=device_user("carol@acme", seen))
    assert "user_code=" in seen[0]
    claims = jwt.decode(entry["access_token"], options={"verify_signature": False})
    assert (claims["sub"], claims["tenant"]) == ("carol@acme", "acme")
    response = httpx.get(f"{secured.url}/v1/models", headers={"authorization": f"Bearer {entry['access_token']}"})
    assert response.status_code == 200


def test_workload_token(secured, oidc_provider):
    token = oidc_provider.client_credentials("gateway", "gateway-secret", "urn:tessera-workers")
    headers = {"authorization": f"Bearer {token}"}
    me = httpx.get(f"{secured.url}/auth/whoami", headers=headers).json()
    assert (me["kind"], me["tenant"], me["subject"], me["scopes"]) == ("workload", "acme", "gateway",
                                                                      ["generate", "read"])
    response = httpx.post(f"{secured.url}/v1/completions", headers=headers,
                          json={"prompt": "hi", "max_tokens": 2, "temperature": 0})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(f"{secured.url}/admin/keys", headers=headers).status_code == 403


def test_wrong_audience_token_refused(secured, oidc_provider):
    token = oidc_provider.client_credentials("other-service", "other-secret", "urn:other-service")
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == "other-service"
    response = httpx.get(f"{secured.url}/v1/models", headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert "audience" in response.json()["error"]["message"]


def test_expired_token_refused(secured, oidc_provider):
    token = oidc_provider.client_credentials("short-lived", "short-secret", "urn:tessera-workers")
    headers = {"authorization": f"Bearer {token}"}
    assert httpx.get(f"{secured.url}/v1/models", headers=headers).status_code == 200
    time.sleep(2.5)
    response = httpx.get(f"{secured.url}/v1/models", headers=headers)
    assert response.status_code == 401 and "expired" in response.json()["error"]["message"]


def _foreign_token(issuer: str, kid: str) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    claims = {"iss": issuer, "aud": "tessera", "sub": "mallory", "tenant": "acme", "scope": "admin",
              "iat": now, "exp": now + 600}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


def test_token_signed_by_an_unknown_key_refused(secured):
    response = httpx.get(f"{secured.url}/admin/keys",
                         headers={"authorization": f"Bearer {_foreign_token(secured.issuer, 'rotated-key-9')}"})
    assert response.status_code == 401
    assert "key the issuer does not publish" in response.json()["error"]["message"]
    # The provider's own key id on a token signed by another key: the signature fails.
    response = httpx.get(f"{secured.url}/admin/keys",
                         headers={"authorization": f"Bearer {_foreign_token(secured.issuer, 'test-key-1')}"})
    assert response.status_code == 401
    assert "signature" in response.json()["error"]["message"]
    failures = [x for x in secured.audit_lines() if x["action"] == "auth.failure" and x["reason"] == "invalid_token"]
    assert failures and all(x["outcome"] == "failure" and x["source"] == "127.0.0.1" for x in failures)


def test_token_of_another_issuer_refused(secured):
    token = _foreign_token("https://issuer.example", "k1")
    response = httpx.get(f"{secured.url}/v1/models", headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 401 and "not accepted" in response.json()["error"]["message"]
