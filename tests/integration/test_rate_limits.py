"""Per-tenant and per-key rate limits: token buckets in memory and in a real Redis shared by two
`tessera serve` processes; tokens charged from actual usage; Redis going down, failing open
and failing closed; OpenAI's x-ratelimit-* headers and Retry-After on 429."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from serving.app import create_app
from serving.auth.access import build_access
from serving.config import ServerConfig
from tests.integration.conftest import ADMIN_KEY, free_port, start_redis, stop
from tests.serving.conftest import SERVER, start_server, wait_until

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@contextmanager
def serving(engine, **settings):
    config = ServerConfig(**SERVER, auth="on", **settings)
    live = start_server(create_app(engine, config, access=build_access(config, {"TESSERA_API_KEY": ADMIN_KEY})))
    try:
        yield live.url, live.server.config.app.state["access"]
    finally:
        live.stop()


def new_key(url: str, tenant: str, scopes=("generate", "read"), **extra) -> dict[str, str]:
    response = httpx.post(f"{url}/admin/keys", headers=ADMIN, json={"tenant": tenant, "scopes": list(scopes), **extra})
    assert response.status_code == 201, response.text
    return {"authorization": f"Bearer {response.json()['key']}"}


def test_requests_per_minute_per_tenant(engine):
    with serving(engine, rate_limit_rpm=3) as (url, _):
        a1, a2, b = new_key(url, "acme"), new_key(url, "acme"), new_key(url, "beta")
        statuses, remaining = [], []
        for headers in (a1, a2, a1):
            response = httpx.get(f"{url}/v1/models", headers=headers)
            statuses.append(response.status_code)
            remaining.append(response.headers["x-ratelimit-remaining-requests"])
            assert response.headers["x-ratelimit-limit-requests"] == "3"
        assert statuses == [200, 200, 200] and remaining == ["2", "1", "0"]
        me = httpx.get(f"{url}/auth/whoami", headers=a1)  # the CLI's check spends no request
        assert me.status_code == 200 and "x-ratelimit-remaining-requests" not in me.headers
        refused = httpx.get(f"{url}/v1/models", headers=a2)  # the tenant's fourth, from its other key
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert 1 <= int(refused.headers["retry-after"]) <= 20  # one request refills in 60/3 s
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
        assert httpx.get(f"{url}/v1/models", headers=b).status_code == 200  # another tenant is not held back
        assert httpx.get(f"{url}/health").status_code == 200  # public routes are not limited


def test_requests_per_minute_per_key_and_a_key_of_its_own(engine):
    with serving(engine, key_rate_limit_rpm=2) as (url, _):
        a, b = new_key(url, "acme"), new_key(url, "acme")
        own = new_key(url, "acme", rpm=4)
        assert [httpx.get(f"{url}/v1/models", headers=a).status_code for _ in range(3)] == [200, 200, 429]
        assert httpx.get(f"{url}/v1/models", headers=b).status_code == 200  # the same tenant's other key
        assert [httpx.get(f"{url}/v1/models", headers=own).status_code for _ in range(5)] == [200] * 4 + [429]


def test_tokens_charged_from_actual_usage_in_redis(engine, redis_url):
    import redis

    with serving(engine, redis_url=redis_url, rate_limit_tpm=30) as (url, _):
        key = new_key(url, "acme")
        body = {"prompt": "hello there", "max_tokens": 20, "ignore_eos": True, "temperature": 0}
        first = httpx.post(f"{url}/v1/completions", headers=key, json=body)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-tokens"] == "30"
        assert first.headers["x-ratelimit-remaining-tokens"] == "30"  # nothing charged before it ran
        used = first.json()["usage"]["total_tokens"]
        assert used == first.json()["usage"]["prompt_tokens"] + 20
        level = float(redis.Redis.from_url(redis_url).hget("tessera:ratelimit:tenant:acme:tokens", "level"))
        assert 30 - used <= level <= 30 - used + 10  # refilled at 0.5 token/s while it ran (< 20 s)
        second = httpx.post(f"{url}/v1/completions", headers=key, json=body)  # the bucket is still positive
        assert second.status_code == 200
        third = httpx.post(f"{url}/v1/completions", headers=key, json=body)  # now it is below zero
        assert third.status_code == 429 and third.headers["x-ratelimit-remaining-tokens"] == "0"
        assert int(third.headers["retry-after"]) >= 2 * used - 30 - 10  # ~2 s per token of debt


def test_a_refused_request_is_not_charged(engine):
    with serving(engine, rate_limit_tpm=1000) as (url, access):
        key = new_key(url, "acme")
        bad = httpx.post(f"{url}/v1/completions", headers=key, json={"prompt": "x", "max_tokens": 10_000})
        assert bad.status_code == 400
        state = access.limiter._state["tenant:acme:tokens"]
        assert state[0] == 1000  # full: a 400 used no tokens


@pytest.mark.parametrize("fail", ["open", "closed"])
def test_redis_going_down(engine, tmp_path, fail):
    redis_down = start_redis(tmp_path)
    with serving(engine, redis_url=redis_down.url, rate_limit_rpm=2, rate_limit_fail=fail) as (url, _):
        key = new_key(url, "acme")
        up = httpx.get(f"{url}/v1/models", headers=key)
        assert up.status_code == 200 and up.headers["x-ratelimit-remaining-requests"] == "1"
        stop(redis_down.process)
        statuses = [httpx.get(f"{url}/v1/models", headers=key) for _ in range(3)]
        if fail == "open":  # served, unlimited (the limit of 2 would have refused the third)
            assert [r.status_code for r in statuses] == [200, 200, 200]
            assert "x-ratelimit-remaining-requests" not in statuses[0].headers
        else:
            assert [r.status_code for r in statuses] == [503, 503, 503]
            assert statuses[0].json()["error"]["code"] == "rate_limiter_unavailable"
            assert statuses[0].headers["retry-after"] == "1"


def test_redis_key_store_down_is_503_not_401(engine, tmp_path):
    redis_down = start_redis(tmp_path)
    with serving(engine, key_store=redis_down.url) as (url, _):
        key = new_key(url, "acme")
        assert httpx.get(f"{url}/v1/models", headers=key).status_code == 200
        stop(redis_down.process)
        response = httpx.get(f"{url}/v1/models", headers=key)
        assert response.status_code == 503 and response.json()["error"]["code"] == "auth_unavailable"
        assert httpx.get(f"{url}/v1/models", headers=ADMIN).status_code == 200  # the bootstrap key needs no store


# -- two processes ------------------------------------------------------------------------------


def _serve_process(tiny_model, redis_url: str, audit_file: Path) -> tuple[subprocess.Popen, str]:
    import os

    port = free_port()
    env = {**os.environ, "TESSERA_MODEL": str(tiny_model), "TESSERA_SERVED_MODEL_NAME": "sub",
           "TESSERA_MAX_NUM_SEQS": "4", "TESSERA_MAX_NUM_BATCHED_TOKENS": "8", "TESSERA_MAX_MODEL_LEN": "128",
           "TESSERA_TOKEN_BUCKETS": "8", "TESSERA_NUM_BLOCKS": "64", "TESSERA_WARM_UP": "false",
           "TESSERA_API_KEY": ADMIN_KEY, "TESSERA_KEY_STORE": redis_url, "TESSERA_REDIS_URL": redis_url,
           "TESSERA_TENANT_RATE_LIMITS": "acme=4:,beta=:30", "TESSERA_AUDIT_FILE": str(audit_file),
           "TESSERA_LOG_LEVEL": "warning", "TESSERA_ALLOW_UNSIGNED": "true"}  # a random, unsigned checkpoint
    process = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--port", str(port)], env=env,
                               cwd=Path(__file__).resolve().parents[2], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    return process, f"http://127.0.0.1:{port}"


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_limits_hold_across_two_processes_sharing_redis(tiny_model, redis_url, tmp_path):
    servers = [_serve_process(tiny_model, redis_url, tmp_path / f"audit{i}.jsonl") for i in range(2)]
    (p1, a), (p2, b) = servers
    try:
        assert wait_until(lambda: (_ready(a) and _ready(b)) or p1.poll() is not None or p2.poll() is not None,
                          120, 0.2)
        assert p1.poll() is None and p2.poll() is None
        acme = new_key(a, "acme")  # created on one, known to both (the Redis key store)
        beta = new_key(b, "beta")
        statuses = [httpx.get(f"{url}/v1/models", headers=acme).status_code for url in (a, b, a, b)]
        assert statuses == [200, 200, 200, 200]
        over = [httpx.get(f"{url}/v1/models", headers=acme) for url in (a, b)]
        assert [r.status_code for r in over] == [429, 429]  # the tenant is over its 4/min on both
        assert all(r.headers["x-ratelimit-limit-requests"] == "4" for r in over)

        # 100 tokens against 30/min: the debt outlasts the first request's compile (refill 0.5/s).
        used = httpx.post(f"{a}/v1/completions", headers=beta, timeout=300,
                          json={"model": "sub", "prompt": "hi", "max_tokens": 100, "ignore_eos": True})
        assert used.status_code == 200 and used.json()["usage"]["total_tokens"] > 100
        refused = httpx.get(f"{b}/v1/models", headers=beta)  # charged on one process, refused by the other
        assert refused.status_code == 429 and refused.headers["x-ratelimit-remaining-tokens"] == "0"
    finally:
        for process, _ in servers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _ in servers:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    lines = [json.loads(x) for x in (tmp_path / "audit0.jsonl").read_text().splitlines()]
    actions = [x["action"] for x in lines]
    # The unsigned model is audited before anything loads; then the configuration and the model.
    assert actions[:2] == ["model.load_unsigned", "config.load"]
    assert "model.load" in actions and actions[-1] == "model.unload"
    created = [x for x in lines if x["action"] == "key.create"]
    assert len(created) == 1 and created[0]["tenant"] == "acme" and created[0]["actor"] == "key:bootstrap"
    assert ADMIN_KEY not in (tmp_path / "audit0.jsonl").read_text()
