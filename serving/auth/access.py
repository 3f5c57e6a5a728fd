"""The server's access layer, built from ServerConfig: who is calling (401), may they (403),
are they within their limits (429), and charging their tokens afterwards.

Auth is on when `auth=on`, or with `auth=auto` (the default) as soon as anything that issues
credentials is configured: `TESSERA_API_KEY`, a key store, an OIDC or a workload issuer.
With auth off every caller is the anonymous admin of tenant `default` (a loud warning at
start-up when the server listens beyond loopback).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from ops.audit import audit_event, configure_audit
from serving.auth.authenticator import Authenticator, CredentialsUnverifiable, Unauthenticated
from serving.auth.key_store import open_key_store
from serving.auth.oidc import TokenPolicy, TokenVerifier
from serving.auth.principal import ANONYMOUS, Principal, parse_scopes
from serving.errors import APIError
from serving.ratelimit.buckets import Decision, Limit, LimitPolicy, RateLimiterUnavailable, parse_tenant_limits
from serving.ratelimit.memory import MemoryRateLimiter
from serving.ratelimit.redis_limiter import RedisRateLimiter

log = logging.getLogger(__name__)
API_KEY_ENV = "TESSERA_API_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class Access:
    authenticator: Authenticator | None  # None: auth off
    limiter: MemoryRateLimiter | RedisRateLimiter
    limits: LimitPolicy
    fail_open: bool = True

    @property
    def enabled(self) -> bool:
        return self.authenticator is not None

    @property
    def key_store(self):
        return self.authenticator.store if self.authenticator is not None else None

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller, or APIError 401 (bad credentials) / 503 (store or issuer unreachable)."""
        if self.authenticator is None:
            return ANONYMOUS
        try:
            return await self.authenticator.authenticate(authorization)
        except Unauthenticated as e:
            raise APIError(401, str(e), code=e.code,
                           headers={"www-authenticate": 'Bearer realm="tessera"'}) from None
        except CredentialsUnverifiable as e:
            log.error("credentials cannot be checked: %s", e)
            raise APIError(503, "credentials cannot be checked right now; retry later",
                           code="auth_unavailable", headers={"retry-after": "5"}) from None

    async def admit(self, principal: Principal) -> Decision | None:
        """Take one request from the caller's buckets; APIError 429 when one is empty."""
        buckets = self.limits.buckets(principal)
        if not buckets:
            return None
        try:
            decision = await self.limiter.admit(buckets)
        except RateLimiterUnavailable as e:
            if self.fail_open:
                log.warning("rate limits not enforced (fail open): %s", e)
                return None
            log.error("request refused (rate limiter fails closed): %s", e)
            raise APIError(503, "the rate limiter is unavailable; retry later", code="rate_limiter_unavailable",
                           headers={"retry-after": "1"}) from None
        if not decision.allowed:
            raise APIError(429, f"rate limit reached for tenant {principal.tenant!r}; retry after "
                                f"{decision.headers()['retry-after']}s", code="rate_limit_exceeded",
                           headers=decision.headers())
        return decision

    async def charge(self, principal: Principal, tokens: int) -> None:
        """Charge the tokens a request used (prompt + completion) to its token buckets."""
        buckets = self.limits.buckets(principal)
        if tokens <= 0 or not buckets:
            return
        try:
            await self.limiter.charge(buckets, tokens)
        except RateLimiterUnavailable as e:
            log.warning("%d tokens of tenant %s not charged: %s", tokens, principal.tenant, e)

    async def close(self) -> None:
        await self.limiter.close()
        if self.key_store is not None:
            await self.key_store.close()


def configure_audit_sinks(config, environ: Mapping[str, str] | None = None) -> None:
    """The audit sinks `tessera serve` was given; none: the process log."""
    environ = os.environ if environ is None else environ
    token = environ.get("TESSERA_AUDIT_HTTP_TOKEN")
    kms = None
    if config.audit_encrypt_rotated:
        from ops.kms import kms_from_uri

        kms = kms_from_uri(config.kms)
    configure_audit(file=config.audit_file, max_bytes=config.audit_max_bytes, backup_count=config.audit_backup_count,
                    stdout=config.audit_stdout, http_url=config.audit_http_url,
                    http_headers={"authorization": f"Bearer {token}"} if token else None,
                    encrypt_rotated_with=kms)


def auth_enabled(config, environ: Mapping[str, str]) -> bool:
    if config.auth != "auto":
        return config.auth == "on"
    return bool(environ.get(API_KEY_ENV) or config.key_store or config.oidc_issuer or config.workload_issuer)


def build_access(config, environ: Mapping[str, str] | None = None) -> Access:
    environ = os.environ if environ is None else environ
    limits = LimitPolicy(Limit(config.rate_limit_rpm, config.rate_limit_tpm),
                         parse_tenant_limits(config.tenant_rate_limits),
                         Limit(config.key_rate_limit_rpm, config.key_rate_limit_tpm))
    limiter = RedisRateLimiter(config.redis_url) if config.redis_url else MemoryRateLimiter()
    authenticator = None
    if auth_enabled(config, environ):
        authenticator = Authenticator(open_key_store(config.key_store), _verifier(config),
                                      bootstrap_key=environ.get(API_KEY_ENV) or None,
                                      bootstrap_tenant=config.admin_tenant)
    elif config.host not in LOOPBACK_HOSTS:
        log.warning("AUTH IS OFF and the server listens on %s: anyone who can reach it is admin. Set "
                    "TESSERA_API_KEY, --key-store or --oidc-issuer (or --auth on) to require credentials.",
                    config.host)
    access = Access(authenticator, limiter, limits, fail_open=config.rate_limit_fail == "open")
    audit_event("config.load", "success", actor="system", object="server",
                settings={"auth": access.enabled, "key_store": access.key_store.describe() if access.key_store else None,
                          "oidc_issuer": config.oidc_issuer, "workload_issuer": config.workload_issuer,
                          "rate_limiter": limiter.describe() if limits.enabled else None,
                          "rate_limit_fail": config.rate_limit_fail, "host": config.host, "port": config.port})
    return access


def _verifier(config) -> TokenVerifier | None:
    policies = []
    if config.oidc_issuer:
        policies.append(TokenPolicy(config.oidc_issuer, config.oidc_audience, kind="oidc",
                                    tenant_claim=config.oidc_tenant_claim, scopes_claim=config.oidc_scopes_claim,
                                    default_tenant=config.oidc_default_tenant, leeway_s=config.jwt_leeway_s))
    if config.workload_issuer:
        policies.append(TokenPolicy(config.workload_issuer, config.workload_audience, kind="workload",
                                    exact_audience=True, tenant_claim=config.workload_tenant_claim,
                                    fixed_scopes=parse_scopes(config.workload_scopes),
                                    default_tenant=config.workload_default_tenant, leeway_s=config.jwt_leeway_s))
    return TokenVerifier(policies) if policies else None
