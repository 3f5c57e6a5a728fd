"""`tessera keys create|list|revoke`, `tessera whoami`, and the scope check every client command
makes before it calls: the server says who the credentials are (/auth/whoami), and a command
whose scope they lack stops with what is missing instead of calling."""

from __future__ import annotations

import sys
import time
from typing import IO

import httpx

from serving.auth.tokens import LoginRequired, authorization_header
from serving.client import ClientError, _raise_for_error

# The scope each client command needs (the server's routes declare the same).
COMMAND_SCOPES = {"complete": "generate", "chat": "generate", "models": "read", "keys create": "admin",
                  "keys list": "admin", "keys revoke": "admin", "top": "read", "transcripts list": "read",
                  "transcripts show": "read", "adapters load": "adapter-manager",
                  "adapters unload": "adapter-manager", "adapters list": "read"}


def _client(url: str) -> httpx.Client:
    try:
        headers = authorization_header()
    except LoginRequired as e:
        raise ClientError(str(e)) from None
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30)


def _request(client: httpx.Client, method: str, path: str, **kwargs) -> httpx.Response:
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as e:
        raise ClientError(f"cannot reach {client.base_url}: {e}") from e
    _raise_for_error(response)
    return response


def whoami(url: str) -> dict | None:
    """The server's view of these credentials; None when the server has no /auth/whoami."""
    with _client(url) as client:
        try:
            response = client.get("/auth/whoami")
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach {client.base_url}: {e}") from e
        if response.status_code == 404:
            return None
        if response.status_code == 401:
            has_credentials = "Authorization" in client.headers
            hint = ("the server refused the credentials" if has_credentials
                    else "no credentials: set TESSERA_API_KEY or run `tessera login`")
            raise ClientError(f"{hint}: {response.json()['error']['message']}")
        _raise_for_error(response)
        return response.json()


def require_scope(url: str, command: str) -> None:
    """Stop before calling when the credentials lack the command's scope."""
    needed = COMMAND_SCOPES.get(command)
    if needed is None:
        return
    me = whoami(url)
    if me is None or not me.get("auth_enabled", True):
        return
    held = set(me["scopes"])
    if needed not in held and "admin" not in held:
        who = f"key {me['key_id']}" if me.get("key_id") else me["subject"]
        raise ClientError(f"`tessera {command}` needs the scope `{needed}`; your credentials ({who}, tenant "
                          f"{me['tenant']}) have: {', '.join(sorted(held)) or 'no scopes'}. Ask an admin for a "
                          f"key with `{needed}`.")


def create_key(url: str, tenant: str, scopes: str, *, expires_in: str | None = None, name: str | None = None,
               rpm: int | None = None, tpm: int | None = None, out: IO[str] | None = None) -> str:
    """Create a key; prints its details, then the key alone on the last line. Returns the key."""
    out = out or sys.stdout
    body = {"tenant": tenant, "scopes": [s for s in scopes.replace(",", " ").split() if s], "expires_in": expires_in,
            "name": name, "rpm": rpm, "tpm": tpm}
    with _client(url) as client:
        created = _request(client, "POST", "/admin/keys", json={k: v for k, v in body.items() if v is not None})
    data = created.json()
    info = data["info"]
    expires = _when(info["expires_at"]) if info["expires_at"] else "never"
    out.write(f"created key {info['key_id']} for tenant {info['tenant']} with scopes {','.join(info['scopes'])}, "
              f"expires {expires}\nthe key is shown once; store it now:\n{data['key']}\n")
    return data["key"]


def list_keys(url: str, tenant: str | None = None, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    with _client(url) as client:
        keys = _request(client, "GET", "/admin/keys", params={"tenant": tenant} if tenant else None).json()["data"]
    out.write("KEY ID\tTENANT\tSCOPES\tSTATUS\tCREATED\tEXPIRES\tNAME\n")
    for k in keys:
        out.write("\t".join([k["key_id"], k["tenant"], ",".join(k["scopes"]), k["status"], _when(k["created_at"]),
                             _when(k["expires_at"]) if k["expires_at"] else "never", k.get("name") or ""]) + "\n")
    return 0


def revoke_key(url: str, key_id: str, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    with _client(url) as client:
        info = _request(client, "DELETE", f"/admin/keys/{key_id}").json()
    out.write(f"revoked key {info['key_id']} of tenant {info['tenant']}\n")
    return 0


def load_adapter(url: str, name: str, path: str, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    with _client(url) as client:
        info = _request(client, "POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}).json()
    out.write(f"loaded adapter {info['lora_name']} as {info['version']} (rank {info['rank']}, "
              f"{','.join(info['targets'])}) in {info['load_seconds']:.3f}s\n")
    return 0


def unload_adapter(url: str, name: str, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    with _client(url) as client:
        info = _request(client, "POST", "/v1/unload_lora_adapter", json={"lora_name": name}).json()
    out.write(f"unloaded adapter {info['lora_name']} ({info['version']}); running requests finish on it\n")
    return 0


def list_adapters(url: str, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    with _client(url) as client:
        state = _request(client, "GET", "/debug/adapters").json()
    out.write(f"slots: {state['max_loras']} ({state['free_slots']} free), max rank {state['max_lora_rank']}\n")
    out.write("NAME\tVERSION\tSLOT\tRANK\tHITS\tMISSES\tLOAD S\tSTATUS\tPATH\n")
    for a in state["adapters"]:
        slot = "host" if a["slot"] is None else str(a["slot"])
        out.write("\t".join([a["name"], a["version"], slot, str(a["rank"]), str(a["hits"]), str(a["misses"]),
                             f"{a['load_seconds']:.3f}", "retired" if a["retired"] else "served", a["path"]]) + "\n")
    return 0


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
