"""Real services on loopback for the identity tests: redis-server and an OpenID Connect provider
(oidc-provider under node, tests/integration/oidc/provider.mjs), each started on a free port
and stopped at the end; plus the serving tests' tiny engine and live-server helpers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.serving.conftest import engine, log_stream, tiny_model  # noqa: F401 - fixtures shared with tests/serving

OIDC_DIR = Path(__file__).parent / "oidc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)


def start_redis(tmp_path: Path) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (make test installs it: apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                "no", "--dir", str(tmp_path), "--protected-mode", "yes"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(f"redis://127.0.0.1:{port}/0", port, process)
    deadline = time.monotonic() + 10
    while True:
        try:
            server.client().ping()
            return server
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    stop(server.process)


@pytest.fixture
def redis_url(redis_server) -> str:
    """The shared Redis, emptied for each test."""
    redis_server.client().flushall()
    return redis_server.url


@dataclass
class OidcProvider:
    issuer: str
    process: subprocess.Popen

    def client_credentials(self, client_id: str, secret: str, resource: str) -> str:
        response = httpx.post(f"{self.issuer}/token", auth=(client_id, secret),
                              data={"grant_type": "client_credentials", "resource": resource})
        assert response.status_code == 200, response.text
        return response.json()["access_token"]


@pytest.fixture(scope="session")
def oidc_provider(tmp_path_factory) -> Iterator[OidcProvider]:
    node = shutil.which("node")
    if node is None or not (OIDC_DIR / "node_modules" / "oidc-provider").exists():
        pytest.fail("node and tests/integration/oidc/node_modules are needed (make test runs npm ci there)")
    port = free_port()
    errors = tmp_path_factory.mktemp("oidc") / "stderr.txt"
    with errors.open("w") as err:
        process = subprocess.Popen([node, str(OIDC_DIR / "provider.mjs"), str(port)], cwd=OIDC_DIR,
                                   stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, "NODE_ENV": "test"})
    line = process.stdout.readline()  # {"issuer": ...} once it listens
    if not line:
        stop(process)
        pytest.fail(f"the OIDC provider did not start: {errors.read_text()[-2000:]}")
    yield OidcProvider(json.loads(line)["issuer"], process)
    stop(process)


# -- a server with every kind of credential --------------------------------------------------

ADMIN_KEY = "bootstrap-admin-key-for-tests-0123456789"  # what TESSERA_API_KEY would hold


@dataclass
class SecuredServer:
    url: str
    live: object
    issuer: str
    audit: object  # io.StringIO with the audit lines

    def audit_lines(self) -> list[dict]:
        return [json.loads(x) for x in self.audit.getvalue().splitlines()]

    def create_key(self, tenant: str, scopes: list[str], **extra) -> tuple[str, str]:
        """(key, key id) made through the admin API with the bootstrap key."""
        response = httpx.post(f"{self.url}/admin/keys", json={"tenant": tenant, "scopes": scopes, **extra},
                              headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert response.status_code == 201, response.text
        return response.json()["key"], response.json()["info"]["key_id"]


def secured_settings(issuer: str, **overrides) -> dict:
    return dict(auth="on", oidc_issuer=issuer, oidc_audience="tessera", jwt_leeway_s=0.0,
                workload_issuer=issuer, workload_audience="tessera-workers",
                workload_tenant_claim="kubernetes.io.namespace", workload_scopes="generate,read") | overrides


@pytest.fixture(scope="module")
def secured(engine, oidc_provider, redis_server, log_stream) -> Iterator[SecuredServer]:
    """A live server with a Redis key store, the bootstrap admin key, OIDC and workload tokens."""
    import io

    from ops.audit import configure_audit, reset_audit
    from serving.app import create_app
    from serving.auth.access import build_access
    from serving.config import ServerConfig
    from tests.serving.conftest import SERVER, start_server

    audit = io.StringIO()
    configure_audit(stream=audit)
    config = ServerConfig(**SERVER, **secured_settings(oidc_provider.issuer, key_store=redis_server.url[:-1] + "1"))  # db 1: rate-limit tests flush db 0
    live = start_server(create_app(engine, config, access=build_access(config, {"TESSERA_API_KEY": ADMIN_KEY})))
    yield SecuredServer(live.url, live, oidc_provider.issuer, audit)
    live.stop()
    reset_audit()
