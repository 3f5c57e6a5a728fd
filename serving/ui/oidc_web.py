"""The UI's OpenID Connect login: authorization code with PKCE (S256), state and nonce, the
server acting as a public client whose redirect URI is <server>/ui/login/callback.

The access token it receives is what the session then sends to the app's guard, so a UI login
is worth exactly what the same token is worth on the API (issuer, audience, tenant, scopes).
The ID token is not used: identity comes from the access token, checked like any bearer.
"""

from __future__ import annotations

import hmac
import secrets
import time
from urllib.parse import urlencode

import httpx

from serving.auth.login import pkce_pair
from serving.auth.oidc import check_issuer_url, discovery_url
from serving.ui.sessions import Session


class LoginFailed(Exception):
    """The login cannot finish; the message is shown on the login page."""


class WebLogin:
    def __init__(self, issuer: str, client_id: str, scopes: str, resource: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        check_issuer_url(issuer)
        self.issuer, self.client_id, self.scopes, self.resource = issuer.rstrip("/"), client_id, scopes, resource
        self._transport = transport
        self._doc: dict | None = None

    async def _discover(self, client: httpx.AsyncClient) -> dict:
        if self._doc is None:
            try:
                response = await client.get(discovery_url(self.issuer))
                response.raise_for_status()
                doc = response.json()
            except (httpx.HTTPError, ValueError) as e:
                raise LoginFailed(f"the identity provider cannot be reached ({e})") from None
            if doc.get("issuer", "").rstrip("/") != self.issuer:
                raise LoginFailed(f"the identity provider names issuer {doc.get('issuer')!r}, not {self.issuer!r}")
            self._doc = doc
        return self._doc

    async def start(self, session: Session, redirect_uri: str, next_page: str) -> str:
        """The authorization URL to send the browser to; the session remembers the login."""
        async with httpx.AsyncClient(transport=self._transport, timeout=10) as client:
            doc = await self._discover(client)
        verifier, challenge = pkce_pair()
        state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        session.login = {"state": state, "nonce": nonce, "verifier": verifier, "redirect_uri": redirect_uri,
                         "next": next_page}
        query = {"response_type": "code", "client_id": self.client_id, "redirect_uri": redirect_uri,
                 "scope": self.scopes, "state": state, "nonce": nonce, "code_challenge": challenge,
                 "code_challenge_method": "S256"}
        if self.resource:
            query["resource"] = self.resource
        return f"{doc['authorization_endpoint']}?{urlencode(query)}"

    async def finish(self, session: Session, code: str | None, state: str | None, error: str | None) -> tuple[str, float | None, str]:
        """(access token, its expiry as Unix time or None, the page to return to)."""
        pending, session.login = session.login, None  # one use, whatever happens
        if pending is None:
            raise LoginFailed("no login is in progress in this browser session; start again")
        if not state or not hmac.compare_digest(state.encode(), pending["state"].encode()):
            raise LoginFailed("the login's state does not match this browser session; start again")
        if error:
            raise LoginFailed(f"the identity provider refused the login: {error}")
        if not code:
            raise LoginFailed("the identity provider sent no authorization code")
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": pending["redirect_uri"],
                "client_id": self.client_id, "code_verifier": pending["verifier"]}
        if self.resource:
            form["resource"] = self.resource
        async with httpx.AsyncClient(transport=self._transport, timeout=10) as client:
            doc = await self._discover(client)
            try:
                response = await client.post(doc["token_endpoint"], data=form)
                tokens = response.json()
            except (httpx.HTTPError, ValueError) as e:
                raise LoginFailed(f"the token endpoint cannot be reached ({e})") from None
        if response.status_code != 200 or "access_token" not in tokens:
            raise LoginFailed(f"the token endpoint refused the code ({tokens.get('error', response.status_code)})")
        expires_in = tokens.get("expires_in")
        expires_at = time.time() + float(expires_in) if isinstance(expires_in, int | float) else None
        return tokens["access_token"], expires_at, pending["next"]
