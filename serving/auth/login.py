"""`tessera login`: OAuth 2.0 authorization code with PKCE (S256) on an ephemeral loopback
redirect (RFC 8252), or the device authorization grant (RFC 8628) where the issuer offers it."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import sys
import threading
import time
import webbrowser
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import IO
from urllib.parse import parse_qs, urlencode, urlparse

import httpx

from serving.auth.oidc import check_issuer_url, discovery_url
from serving.auth.tokens import _oauth_error, save_tokens

DEFAULT_SCOPES = "openid offline_access generate read"


class LoginError(Exception):
    pass


def discover(issuer: str, client: httpx.Client) -> dict:
    check_issuer_url(issuer)
    try:
        response = client.get(discovery_url(issuer))
        response.raise_for_status()
        doc = response.json()
    except (httpx.HTTPError, ValueError) as e:
        raise LoginError(f"cannot read {discovery_url(issuer)}: {e}") from e
    if doc.get("issuer", "").rstrip("/") != issuer.rstrip("/"):
        raise LoginError(f"the discovery document names issuer {doc.get('issuer')!r}, not {issuer!r}")
    return doc


def pkce_pair() -> tuple[str, str]:
    """(code verifier, its S256 challenge)."""
    verifier = secrets.token_urlsafe(64)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def choose_flow(doc: dict, flow: str) -> str:
    if flow in ("browser", "device"):
        if flow == "device" and not doc.get("device_authorization_endpoint"):
            raise LoginError("the issuer does not offer the device flow (no device_authorization_endpoint)")
        return flow
    headless = sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return "device" if headless and doc.get("device_authorization_endpoint") else "browser"


def login(issuer: str, client_id: str, *, scopes: str = DEFAULT_SCOPES, flow: str = "auto",
          resource: str | None = None, open_url: Callable[[str], object] | None = None, out: IO[str] | None = None,
          timeout_s: float = 300.0, transport: httpx.BaseTransport | None = None) -> dict:
    """Log in and cache the tokens; returns the cache entry. `open_url` shows the user a URL
    (default: the web browser, and the URL is printed too)."""
    out = out or sys.stderr
    with httpx.Client(transport=transport, timeout=30) as client:
        doc = discover(issuer, client)
        chosen = choose_flow(doc, flow)
        extra = {"resource": resource} if resource else {}
        if chosen == "device":
            tokens = _device(client, doc, client_id, scopes, extra, open_url, out, timeout_s)
        else:
            tokens = _browser(client, doc, client_id, scopes, extra, open_url, out, timeout_s)
    return save_tokens(issuer.rstrip("/"), client_id, doc["token_endpoint"], tokens)


class _Callback(BaseHTTPRequestHandler):
    result: dict[str, str] | None = None

    def do_GET(self):  # noqa: N802
        url = urlparse(self.path)
        if url.path != "/callback":
            self.send_error(404)
            return
        type(self).result = {k: v[0] for k, v in parse_qs(url.query).items()}
        body = b"<html><body><h1>Tessera: you are logged in.</h1>You may close this window.</body></html>"
        if "error" in type(self).result:
            body = b"<html><body><h1>Tessera: the login failed.</h1>See the terminal.</body></html>"
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _browser(client: httpx.Client, doc: dict, client_id: str, scopes: str, extra: dict,
             open_url: Callable[[str], object] | None, out: IO[str], timeout_s: float) -> dict:
    if "S256" not in doc.get("code_challenge_methods_supported", ["S256"]):
        raise LoginError("the issuer does not support PKCE with S256")
    handler = type("Callback", (_Callback,), {"result": None})
    server = HTTPServer(("127.0.0.1", 0), handler)  # an ephemeral port, loopback only
    redirect_uri = f"http://127.0.0.1:{server.server_port}/callback"
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(24)
    url = doc["authorization_endpoint"] + "?" + urlencode({
        "response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri, "scope": scopes,
        "state": state, "nonce": secrets.token_urlsafe(24), "code_challenge": challenge,
        "code_challenge_method": "S256", "prompt": "consent", **extra,
    })
    thread = threading.Thread(target=_serve_until_called, args=(server, handler, timeout_s), daemon=True)
    thread.start()
    try:
        out.write(f"Opening the browser to log in; if it does not open, visit:\n  {url}\n")
        out.flush()
        (open_url or webbrowser.open)(url)
        thread.join(timeout_s)
    finally:
        server.server_close()
    result = handler.result
    if result is None:
        raise LoginError(f"no answer on {redirect_uri} within {timeout_s:.0f}s")
    if "error" in result:
        raise LoginError(f"the issuer refused: {result['error']} {result.get('error_description', '')}".strip())
    if not secrets.compare_digest(result.get("state", ""), state):
        raise LoginError("the answer's state does not match this login (a forged redirect?)")
    return _token(client, doc, {"grant_type": "authorization_code", "code": result.get("code", ""),
                                "redirect_uri": redirect_uri, "client_id": client_id, "code_verifier": verifier,
                                **extra})


def _serve_until_called(server: HTTPServer, handler, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    server.timeout = 0.5
    while handler.result is None and time.monotonic() < deadline:
        server.handle_request()


def _device(client: httpx.Client, doc: dict, client_id: str, scopes: str, extra: dict,
            open_url: Callable[[str], object] | None, out: IO[str], timeout_s: float) -> dict:
    response = client.post(doc["device_authorization_endpoint"], data={"client_id": client_id, "scope": scopes,
                                                                      **extra})
    if response.status_code != 200:
        raise LoginError(f"the issuer refused the device flow ({_oauth_error(response)})")
    grant = response.json()
    where = grant.get("verification_uri_complete") or grant["verification_uri"]
    out.write(f"To log in, visit {grant['verification_uri']} and enter the code {grant['user_code']}\n")
    out.flush()
    if open_url is not None:
        open_url(where)
    interval = float(grant.get("interval", 5))
    deadline = time.monotonic() + min(float(grant.get("expires_in", timeout_s)), timeout_s)
    while time.monotonic() < deadline:
        time.sleep(interval)
        response = client.post(doc["token_endpoint"], data={
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code", "device_code": grant["device_code"],
            "client_id": client_id, **extra})
        if response.status_code == 200:
            return response.json()
        error = _error_code(response)
        if error == "slow_down":
            interval += 5
        elif error != "authorization_pending":
            raise LoginError(f"the device login failed ({_oauth_error(response)})")
    raise LoginError("the device code expired before the login was completed")


def _token(client: httpx.Client, doc: dict, form: dict) -> dict:
    response = client.post(doc["token_endpoint"], data=form)
    if response.status_code != 200:
        raise LoginError(f"the token endpoint refused the code ({_oauth_error(response)})")
    tokens = response.json()
    if "access_token" not in tokens:
        raise LoginError("the token endpoint's answer has no access_token")
    return tokens


def _error_code(response: httpx.Response) -> str | None:
    try:
        return response.json().get("error")
    except ValueError:
        return None
