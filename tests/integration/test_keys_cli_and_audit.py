"""`tessera keys create/list/revoke` and `whoami` against a running server with a Redis key store;
the CLI's scope check before calling; /debug per tenant; and the audit line of every event,
with no key, token or prompt in any of them."""

from __future__ import annotations

import httpx
import pytest

from ops.audit import FIELDS
from serving.cli import main
from tests.integration.conftest import ADMIN_KEY

SECRET_PROMPT = "the-launch-code-is-4711"


@pytest.fixture
def as_caller(monkeypatch, tmp_path):
    monkeypatch.setenv("TESSERA_TOKEN_CACHE", str(tmp_path / "tokens.json"))  # no cached login

    def use(key: str | None) -> None:
        if key is None:
            monkeypatch.delenv("TESSERA_API_KEY", raising=False)
        else:
            monkeypatch.setenv("TESSERA_API_KEY", key)
    return use


def test_keys_create_list_revoke(secured, as_caller, capsys):
    as_caller(ADMIN_KEY)
    assert main(["keys", "create", "--url", secured.url, "--tenant", "acme", "--scopes", "generate,read",
                 "--expires-in", "30d", "--name", "ci-bot", "--rpm", "100"]) == 0
    out = capsys.readouterr().out.splitlines()
    key = out[-1]
    assert key.startswith("tsk_") and key.strip() == key and " " not in key  # alone on its last line
    key_id = key.split("_")[1]
    assert key_id in out[0] and "tenant acme" in out[0] and "generate,read" in out[0]
    me = httpx.get(f"{secured.url}/auth/whoami", headers={"authorization": f"Bearer {key}"}).json()
    assert (me["tenant"], me["key_id"], me["scopes"]) == ("acme", key_id, ["generate", "read"])

    assert main(["keys", "list", "--url", secured.url, "--tenant", "acme"]) == 0
    listing = capsys.readouterr().out
    row = next(line for line in listing.splitlines() if line.startswith(key_id))
    assert row.split("\t")[1:4] == ["acme", "generate,read", "active"] and row.endswith("ci-bot")
    secret = key.split("_", 2)[2]  # the secret may itself hold "_" (base64url)
    assert len(secret) == 43 and secret not in listing

    assert main(["keys", "revoke", "--url", secured.url, key_id]) == 0
    assert f"revoked key {key_id}" in capsys.readouterr().out
    response = httpx.get(f"{secured.url}/v1/models", headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "revoked_api_key"

    lines = secured.audit_lines()
    create = [x for x in lines if x["action"] == "key.create" and x["key_id"] == key_id]
    revoke = [x for x in lines if x["action"] == "key.revoke" and x["key_id"] == key_id]
    assert len(create) == len(revoke) == 1
    for line in create + revoke:
        assert (line["outcome"], line["actor"], line["tenant"], line["object"], line["source"]) == (
            "success", "key:bootstrap", "acme", f"key:{key_id}", "127.0.0.1")
        assert len(line["request_id"]) == 32
    assert create[0]["scopes"] == ["generate", "read"] and create[0]["expires_at"] > 0
    assert key.split("_", 2)[2] not in secured.audit.getvalue() and ADMIN_KEY not in secured.audit.getvalue()


def test_cli_says_which_scope_is_missing_without_calling(secured, as_caller, capsys):
    reader, reader_id = secured.create_key("acme", ["read"])
    as_caller(reader)
    before = len(secured.audit_lines())
    assert main(["keys", "list", "--url", secured.url]) == 1
    error = capsys.readouterr().err
    assert f"`tessera keys list` needs the scope `admin`; your credentials (key {reader_id}, tenant acme) have: read" \
        in error
    assert main(["complete", "--url", secured.url, "hello"]) == 1
    assert "needs the scope `generate`" in capsys.readouterr().err
    assert not [x for x in secured.audit_lines()[before:] if x["action"] == "authz.denied"]  # nothing was called
    assert main(["models", "--url", secured.url]) == 0  # read is enough for this one


def test_cli_without_credentials(secured, as_caller, capsys):
    as_caller(None)
    assert main(["keys", "list", "--url", secured.url]) == 1
    assert "no credentials: set TESSERA_API_KEY or run `tessera login`" in capsys.readouterr().err


def test_audit_lines_for_failures_and_denials_hold_no_secret_or_prompt(secured):
    writer, writer_id = secured.create_key("acme", ["generate"])
    ok = httpx.post(f"{secured.url}/v1/completions", headers={"authorization": f"Bearer {writer}"},
                    json={"prompt": SECRET_PROMPT, "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200
    wrong = writer[:-6] + "zzzzzz"
    bad = httpx.get(f"{secured.url}/v1/models", headers={"authorization": f"Bearer {wrong}"})
    assert bad.status_code == 401
    denied = httpx.get(f"{secured.url}/admin/keys", headers={"authorization": f"Bearer {writer}"})
    assert denied.status_code == 403

    lines = secured.audit_lines()
    failure = [x for x in lines if x["action"] == "auth.failure" and x["key_id"] == writer_id]
    assert len(failure) == 1
    assert (failure[0]["outcome"], failure[0]["reason"], failure[0]["object"], failure[0]["request_id"],
            failure[0]["source"]) == ("failure", "invalid_api_key", "/v1/models", bad.headers["x-request-id"],
                                      "127.0.0.1")
    denial = [x for x in lines if x["action"] == "authz.denied" and x["key_id"] == writer_id]
    assert len(denial) == 1
    assert (denial[0]["outcome"], denial[0]["actor"], denial[0]["tenant"], denial[0]["required_scope"],
            denial[0]["request_id"]) == ("denied", f"key:{writer_id}", "acme", "admin", denied.headers["x-request-id"])
    assert all(list(x)[: len(FIELDS)] == list(FIELDS) for x in lines)
    text = secured.audit.getvalue()
    for secret in (SECRET_PROMPT, writer.split("_", 2)[2], wrong.split("_", 2)[2], ADMIN_KEY):
        assert secret not in text


def test_config_change_is_audited(secured):
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    response = httpx.put(f"{secured.url}/admin/rate-limits/gamma", headers=admin, json={"rpm": 3, "tpm": None})
    assert response.status_code == 200
    assert httpx.get(f"{secured.url}/admin/rate-limits", headers=admin).json()["tenants"]["gamma"] == {
        "rpm": 3, "tpm": None}
    change = [x for x in secured.audit_lines() if x["action"] == "config.change"][-1]
    assert (change["object"], change["tenant"], change["actor"], change["changes"]) == (
        "rate_limits:gamma", "gamma", "key:bootstrap", {"rpm": [None, 3], "tpm": [None, None]})
    gamma, _ = secured.create_key("gamma", ["read"])
    statuses = [httpx.get(f"{secured.url}/v1/models", headers={"authorization": f"Bearer {gamma}"}).status_code
                for _ in range(4)]
    assert statuses == [200] * 3 + [429]  # one more request every 20 s


def test_debug_shows_a_caller_only_its_tenant(secured):
    keys = {t: secured.create_key(t, ["generate", "read"])[0] for t in ("acme", "beta")}
    ids = {}
    for tenant, key in keys.items():
        response = httpx.post(f"{secured.url}/v1/completions", headers={"authorization": f"Bearer {key}"},
                              json={"prompt": "hi", "max_tokens": 1})
        ids[tenant] = response.headers["x-request-id"]
    for tenant, key in keys.items():
        seen = httpx.get(f"{secured.url}/debug/requests", headers={"authorization": f"Bearer {key}"}).json()
        assert {r["tenant"] for r in seen["requests"]} == {tenant}
        assert ids[tenant] in {r["request_id"] for r in seen["requests"]}
    everything = httpx.get(f"{secured.url}/debug/requests", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert set(ids.values()) <= {r["request_id"] for r in everything["requests"]}
