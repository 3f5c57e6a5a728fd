"""Identity and access pieces on their own: keys and hashing, the file key store, bucket
arithmetic and OpenAI's headers, limit parsing, claims, the JWKS cache and token policies."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from serving.auth.authenticator import Authenticator, Unauthenticated
from serving.auth.key_store import FileKeyStore, MemoryKeyStore
from serving.auth.keys import new_key, parse_duration, split_key
from serving.auth.oidc import IssuerKeys, TokenInvalid, TokenPolicy, TokenVerifier, claim
from serving.auth.principal import Principal, parse_scopes
from serving.config import ServerConfig
from serving.ratelimit.buckets import Bucket, Decision, Limit, LimitPolicy, format_reset, parse_tenant_limits
from serving.ratelimit.memory import MemoryRateLimiter
from tests.helpers.fake_issuer import ISSUER, FakeIssuer


def run(coro):
    return asyncio.run(coro)


def test_key_format_and_salted_hash():
    key, record = new_key("acme", ["generate"], expires_in_s=60)
    key_id, secret = split_key(key)
    assert key_id == record.key_id and len(secret) == 43 and key.startswith("tsk_")
    assert secret not in json.dumps(record.to_dict()) and record.matches(secret) and not record.matches(secret[:-1] + "x")
    _, other = new_key("acme", ["generate"])
    assert other.salt != record.salt  # every key its own salt
    assert record.status() == "active" and record.status(now=record.expires_at) == "expired"
    assert "hash" not in record.public() and "salt" not in record.public()
    assert split_key("tsk_xyz_short") is None


def test_durations_and_scopes():
    assert [parse_duration(x) for x in ("30d", "12h", "90m", "3600", "1.5s")] == [2592000, 43200, 5400, 3600, 1.5]
    with pytest.raises(ValueError):
        parse_duration("soon")
    assert parse_scopes("generate, read") == {"generate", "read"}
    assert parse_scopes("openid generate offline_access", strict=False) == {"generate"}
    with pytest.raises(ValueError, match="unknown scopes"):
        parse_scopes("generate,root")
    admin = Principal("k", "t", frozenset({"admin"}))
    assert admin.has("adapter-manager") and not Principal("k", "t", frozenset({"read"})).has("generate")


def test_file_store_atomic_private_and_shared_between_instances(tmp_path):
    path = tmp_path / "keys" / "keys.json"
    one, two = FileKeyStore(path), FileKeyStore(path)
    key, record = new_key("acme", ["read"])
    run(one.add(record))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [r.key_id for r in run(two.list())] == [record.key_id]  # another process's view, re-read
    assert key.split("_", 2)[2] not in path.read_text()
    _, record2 = new_key("beta", ["generate"])
    run(two.add(record2))
    run(one.revoke(record.key_id))
    assert {r.key_id: r.status() for r in run(two.list())} == {record.key_id: "revoked", record2.key_id: "active"}
    assert [r.key_id for r in run(one.list("beta"))] == [record2.key_id]
    assert sorted(p.name for p in path.parent.iterdir()) == ["keys.json", "keys.json.lock"]  # no temp files left


def test_authenticator_bootstrap_and_store_keys():
    store = MemoryKeyStore()
    key, record = new_key("acme", ["generate"])
    run(store.add(record))
    auth = Authenticator(store, bootstrap_key="boot-secret", bootstrap_tenant="ops")
    boot = run(auth.authenticate("Bearer boot-secret"))
    assert (boot.key_id, boot.tenant, boot.is_admin) == ("bootstrap", "ops", True)
    assert run(auth.authenticate(f"bearer {key}")).tenant == "acme"
    for header, code in ((None, "missing_credentials"), ("Basic abc", "invalid_api_key"),
                         ("Bearer boot-secreT", "invalid_api_key"), (f"Bearer {key[:-1]}x", "invalid_api_key")):
        with pytest.raises(Unauthenticated) as e:
            run(auth.authenticate(header))
        assert e.value.code == code
    run(store.revoke(record.key_id))
    with pytest.raises(Unauthenticated, match="revoked"):
        run(auth.authenticate(f"Bearer {key}"))


def test_token_buckets_refill_and_debt():
    now = [1000.0]
    limiter = MemoryRateLimiter(clock=lambda: now[0])
    requests, tokens = Bucket("t:r", "requests", 6), Bucket("t:t", "tokens", 60)
    assert [run(limiter.admit([requests])).allowed for _ in range(7)] == [True] * 6 + [False]
    denied = run(limiter.admit([requests]))
    assert denied.retry_after_s == pytest.approx(10.0)  # 6/min: one every 10 s
    now[0] += 10
    assert run(limiter.admit([requests])).allowed
    run(limiter.charge([requests, tokens], 90))  # usage beyond the bucket: 30 tokens of debt
    assert limiter._state["t:r"][0] == pytest.approx(0.0)  # request buckets are not charged tokens
    decision = run(limiter.admit([tokens]))
    assert not decision.allowed and decision.retry_after_s == pytest.approx(31.0)  # back to 1 token at 1/s
    now[0] += 31
    assert run(limiter.admit([tokens])).allowed


def test_openai_headers():
    requests, tokens = Bucket("a", "requests", 60), Bucket("b", "tokens", 1000)
    decision = Decision(False, 2.2, {requests: 0.4, tokens: 250.0})
    assert decision.headers() == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m0s", "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "250", "x-ratelimit-reset-tokens": "45s", "retry-after": "3",
    }
    assert [format_reset(s) for s in (0.12, 1, 59.5, 360, 3723)] == ["120ms", "1s", "1m0s", "6m0s", "1h2m3s"]


def test_limit_policy_and_parsing():
    assert parse_tenant_limits("acme=600:100000, beta=60:, gamma=:500") == {
        "acme": Limit(600, 100000), "beta": Limit(60, None), "gamma": Limit(None, 500)}
    for bad in ("acme=600", "=1:2", "acme=x:1", "acme=0:1"):
        with pytest.raises(ValueError, match="tenant_rate_limits"):
            parse_tenant_limits(bad)
    policy = LimitPolicy(Limit(10, None), {"acme": Limit(None, 500)}, Limit(5, None))
    key = Principal("key:k1", "acme", frozenset({"generate"}), key_id="k1", tpm=50)
    assert [(b.name, b.capacity) for b in policy.buckets(key)] == [
        ("tenant:acme:tokens", 500), ("key:k1:requests", 5), ("key:k1:tokens", 50)]
    assert policy.buckets(Principal("key:a", "acme", frozenset({"admin"}), key_id="a")) == []


def test_config_checks_access_settings():
    with pytest.raises(ValueError, match="oidc_audience"):
        ServerConfig(oidc_issuer="https://id.example")
    with pytest.raises(ValueError, match="https"):
        ServerConfig(oidc_issuer="http://id.example", oidc_audience="a")
    with pytest.raises(ValueError, match="rate_limit_fail"):
        ServerConfig(rate_limit_fail="maybe")
    with pytest.raises(ValueError, match="unknown scopes"):
        ServerConfig(workload_scopes="generate,root")
    assert ServerConfig.from_sources(environ={"TESSERA_RATE_LIMIT_RPM": "60", "TESSERA_AUTH": "on"}).rate_limit_rpm == 60


def test_claim_paths():
    claims = {"kubernetes.io": {"namespace": "acme"}, "tenant": "t", "org": {"id": "o1"}}
    assert claim(claims, "kubernetes.io.namespace") == "acme"
    assert (claim(claims, "tenant"), claim(claims, "org.id"), claim(claims, "org.nope")) == ("t", "o1", None)


# -- the JWKS cache and token policies, against a local issuer (httpx MockTransport) ---------------

def test_jwks_refetched_for_a_new_kid_but_not_for_every_unknown_one():
    issuer = FakeIssuer()
    rotated, never_published = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    verifier = TokenVerifier([TokenPolicy(ISSUER, "tessera")], transport=httpx.MockTransport(issuer.handler),
                             min_refresh_s=2.0)

    async def scenario():
        assert (await verifier.verify(issuer.token())).tenant == "acme"
        await verifier.verify(issuer.token())
        assert issuer.jwks_requests == 1  # cached
        issuer.keys["k2"] = rotated
        issuer.published.add("k2")  # the issuer rotates
        await asyncio.sleep(2.05)
        assert (await verifier.verify(issuer.token("k2"))).subject == "svc"
        assert issuer.jwks_requests == 2
        issuer.keys["k3"] = never_published
        with pytest.raises(TokenInvalid, match="does not publish"):
            await verifier.verify(issuer.token("k3"))
        with pytest.raises(TokenInvalid, match="does not publish"):
            await verifier.verify(issuer.token("k3"))
        assert issuer.jwks_requests == 2  # an unknown kid right after a fetch does not fetch again

    run(scenario())


def test_token_policies():
    issuer = FakeIssuer()
    transport = httpx.MockTransport(issuer.handler)
    verifier = TokenVerifier([
        TokenPolicy(ISSUER, "tessera", leeway_s=0),
        TokenPolicy(ISSUER, "workers", kind="workload", exact_audience=True, tenant_claim="ns",
                    fixed_scopes=frozenset({"generate"}), leeway_s=0),
    ], transport=transport)
    now = int(time.time())
    user = run(verifier.verify(issuer.token(aud=["tessera", "other"], scope="read admin openid")))
    assert (user.kind, user.scopes) == ("oidc", {"read", "admin"})
    work = run(verifier.verify(issuer.token(aud="workers", ns="team-a", scope="admin")))
    assert (work.kind, work.tenant, work.scopes) == ("workload", "team-a", {"generate"})
    refusals = {
        "audience": issuer.token(aud=["workers", "other"], ns="a"),  # workload audience must be exact
        "expired": issuer.token(exp=now - 5),
        "not valid yet": issuer.token(nbf=now + 60),
        "no tenant": issuer.token(tenant=None),
        "not accepted": issuer.token(iss="https://elsewhere.test"),
    }
    for words, token in refusals.items():
        with pytest.raises(TokenInvalid, match=words):
            run(verifier.verify(token))
    with pytest.raises(TokenInvalid, match="algorithm"):
        run(verifier.verify(jwt.encode({"iss": ISSUER, "aud": "tessera"}, "a-shared-secret-of-thirty-two-bytes!", algorithm="HS256")))


def test_issuer_keys_refuse_plain_http_beyond_loopback():
    with pytest.raises(ValueError, match="https"):
        IssuerKeys("http://issuer.test")
    IssuerKeys("http://127.0.0.1:8080")


def test_auth_on_when_credentials_are_configured_and_a_loud_warning_when_open(caplog):
    from serving.auth.access import build_access

    assert not build_access(ServerConfig(), {}).enabled
    assert build_access(ServerConfig(), {"TESSERA_API_KEY": "k"}).enabled
    assert build_access(ServerConfig(key_store="/tmp/does-not-matter.json"), {}).enabled
    assert not build_access(ServerConfig(auth="off"), {"TESSERA_API_KEY": "k"}).enabled
    with caplog.at_level("WARNING"):
        build_access(ServerConfig(host="0.0.0.0"), {})
    assert "AUTH IS OFF" in caplog.text and "0.0.0.0" in caplog.text
