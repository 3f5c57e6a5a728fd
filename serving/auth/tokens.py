"""The CLI's credentials: `TESSERA_API_KEY`, else the token `tessera login` cached, refreshed
when it is about to expire.

The cache is one JSON file (mode 0600, replaced atomically): `TESSERA_TOKEN_CACHE`, else
`$XDG_CONFIG_HOME/tessera/tokens.json` (`~/.config/tessera/tokens.json`). It keeps the
tokens of each (issuer, client id) and which one is current.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx

from serving.auth.private_file import write_private_file

REFRESH_BEFORE_S = 60.0


class LoginRequired(Exception):
    """No usable token: the message says what to run."""


def cache_path() -> Path:
    if os.environ.get("TESSERA_TOKEN_CACHE"):
        return Path(os.environ["TESSERA_TOKEN_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "tessera" / "tokens.json"


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {"current": None, "tokens": {}}
    except ValueError as e:
        raise LoginRequired(f"the token cache {path} is unreadable ({e}); run `tessera login` again") from e


def save_tokens(issuer: str, client_id: str, token_endpoint: str, response: dict, path: Path | None = None,
                previous_refresh_token: str | None = None) -> dict:
    """Store a token endpoint's answer as the current login; returns the stored entry."""
    path = path or cache_path()
    cache = _load(path)
    entry = {
        "issuer": issuer, "client_id": client_id, "token_endpoint": token_endpoint,
        "access_token": response["access_token"],
        "refresh_token": response.get("refresh_token") or previous_refresh_token,
        "expires_at": time.time() + float(response.get("expires_in", 300)),
        "scope": response.get("scope"),
    }
    name = f"{issuer}|{client_id}"
    cache["tokens"][name] = entry
    cache["current"] = name
    write_private_file(path, json.dumps(cache, indent=1))
    return entry


def forget_tokens(path: Path | None = None) -> bool:
    path = path or cache_path()
    cache = _load(path)
    if not cache.get("current"):
        return False
    cache["tokens"].pop(cache["current"], None)
    cache["current"] = None
    write_private_file(path, json.dumps(cache, indent=1))
    return True


def current_access_token(path: Path | None = None, *, transport: httpx.BaseTransport | None = None) -> str | None:
    """The current login's access token, refreshed first when it expires within a minute;
    None when nobody logged in."""
    path = path or cache_path()
    cache = _load(path)
    entry = cache["tokens"].get(cache.get("current") or "")
    if entry is None:
        return None
    if entry["expires_at"] - REFRESH_BEFORE_S > time.time():
        return entry["access_token"]
    if not entry.get("refresh_token"):
        raise LoginRequired(f"the token from {entry['issuer']} has expired; run `tessera login` again")
    return refresh(entry, path, transport=transport)["access_token"]


def refresh(entry: dict, path: Path | None = None, *, transport: httpx.BaseTransport | None = None) -> dict:
    try:
        with httpx.Client(transport=transport, timeout=30) as client:
            response = client.post(entry["token_endpoint"], data={
                "grant_type": "refresh_token", "refresh_token": entry["refresh_token"],
                "client_id": entry["client_id"],
            })
    except httpx.HTTPError as e:
        raise LoginRequired(f"cannot refresh the token at {entry['token_endpoint']}: {e}") from e
    if response.status_code != 200:
        raise LoginRequired(f"the issuer refused to refresh the token ({_oauth_error(response)}); "
                            "run `tessera login` again")
    return save_tokens(entry["issuer"], entry["client_id"], entry["token_endpoint"], response.json(), path,
                       previous_refresh_token=entry["refresh_token"])


def authorization_header() -> dict[str, str]:
    """The header the client commands send: the API key, else the cached token, else none."""
    key = os.environ.get("TESSERA_API_KEY")
    if key:
        return {"Authorization": f"Bearer {key}"}
    token = current_access_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _oauth_error(response: httpx.Response) -> str:
    try:
        body = response.json()
        return f"{body.get('error')}: {body.get('error_description', '')}".strip(": ")
    except ValueError:
        return f"HTTP {response.status_code}"
