"""Browser sessions of the admin UI: a random id in an HttpOnly cookie, the state on the server.

A session holds the credentials the browser logged in with (an API key or an OIDC access
token, sent to the app's own guard as `Authorization: Bearer ...`, so the UI has exactly the
API's scopes), a CSRF token, an OIDC login in progress, and the playground turns and playback
uploads waiting for their stream. The browser never sees the credentials.

Kept in this process's memory: bounded in count (the oldest idle sessions go first) and in
idle time. A restart logs everyone out; replicas need sticky sessions (BUILD_NOTES).
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

COOKIE = "tessera_ui"
COOKIE_PATH = "/ui"
MAX_PENDING = 16  # playground turns and playback uploads waiting per session


@dataclass
class Session:
    id: str
    csrf_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    authorization: str | None = None
    """`Bearer <key or access token>` once logged in; None: anonymous (the guard decides)."""
    expires_at: float | None = None
    """When an OIDC access token runs out (the session logs out then)."""
    login: dict[str, str] | None = None
    """An OIDC login in progress: state, nonce, PKCE verifier, redirect URI, the page to return to."""
    pending: OrderedDict[str, Any] = field(default_factory=OrderedDict)
    """Playground turns and playback sources waiting for their stream, by random id."""
    last_seen: float = field(default_factory=time.monotonic)

    def csrf_matches(self, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(presented.encode(), self.csrf_token.encode())

    def put_pending(self, item: Any) -> str:
        key = secrets.token_urlsafe(16)
        self.pending[key] = item
        while len(self.pending) > MAX_PENDING:
            self.pending.popitem(last=False)
        return key

    def credentials_expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


class SessionStore:
    def __init__(self, max_sessions: int = 10_000, idle_timeout_s: float = 8 * 3600):
        self.max_sessions, self.idle_timeout_s = max_sessions, idle_timeout_s
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def get(self, session_id: str | None) -> Session | None:
        session = self._sessions.get(session_id or "")
        if session is None:
            return None
        now = time.monotonic()
        if now - session.last_seen > self.idle_timeout_s:
            del self._sessions[session.id]
            return None
        session.last_seen = now
        self._sessions.move_to_end(session.id)
        return session

    def new(self) -> Session:
        session = Session(secrets.token_urlsafe(32))
        self._sessions[session.id] = session
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return session

    def rotate(self, session: Session) -> Session:
        """A fresh id and CSRF token for a session whose privileges change (login): an id an
        attacker planted before the login is worth nothing after it."""
        self._sessions.pop(session.id, None)
        fresh = self.new()
        fresh.pending = session.pending
        return fresh

    def drop(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    def __len__(self) -> int:
        return len(self._sessions)
