"""Bearer JWTs from an OpenID Connect issuer or a workload identity issuer (Kubernetes
service-account tokens and the like), checked against the issuer's published keys.

The issuer's discovery document names its JWKS; the keys are cached for `jwks_ttl_s` and
fetched again when a token names a key id (`kid`) the cache lacks (key rotation), at most
once per `min_refresh_s` so that tokens with made-up key ids cannot hammer the issuer.
`iss`, `aud`, `exp` and `nbf` are checked (with `leeway_s` of clock skew); a workload
policy wants its audience exactly (`aud` is that one value and nothing else).

Everything in a token is the caller's: any header or claim may have any JSON type, size or
nesting, signed or not. Whatever does not parse as expected is `TokenInvalid` (a 401), never
another exception; values shown back in messages are cut short.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import httpx
import jwt

from serving.auth.principal import Principal, parse_scopes

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
MAX_NAME_CHARS = 256  # a tenant or subject: it names buckets, log lines and metrics


class TokenInvalid(Exception):
    """The token cannot be accepted; the message says why (it is shown to the caller)."""


class IssuerUnavailable(Exception):
    """The issuer's discovery document or keys cannot be fetched."""


def discovery_url(issuer: str) -> str:
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


def check_issuer_url(issuer: str) -> None:
    """https, or http only on loopback (a test or a sidecar issuer)."""
    url = urlparse(issuer)
    loopback = url.hostname in ("localhost", "127.0.0.1", "::1")
    if url.scheme != "https" and not (url.scheme == "http" and loopback):
        raise ValueError(f"issuer {issuer!r} must be an https URL (http only on loopback)")


class IssuerKeys:
    """An issuer's discovery document and JWKS, cached."""

    def __init__(self, issuer: str, *, jwks_ttl_s: float = 3600.0, min_refresh_s: float = 10.0,
                 transport: httpx.AsyncBaseTransport | None = None, timeout_s: float = 5.0):
        check_issuer_url(issuer)
        self.issuer = issuer.rstrip("/")
        self.jwks_ttl_s, self.min_refresh_s = jwks_ttl_s, min_refresh_s
        self._transport, self._timeout_s = transport, timeout_s
        self._keys: dict[str, jwt.PyJWK] = {}
        self._jwks_uri: str | None = None
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def key(self, kid: str | None) -> jwt.PyJWK:
        """The signing key `kid` names (the only key, when the token names none)."""
        if time.monotonic() - self._fetched_at > self.jwks_ttl_s:
            await self._refresh(force=True)
        found = self._find(kid)
        if found is None and time.monotonic() - self._fetched_at >= self.min_refresh_s:
            await self._refresh(force=False)  # rotated keys: look once more
            found = self._find(kid)
        if found is None:
            raise TokenInvalid(f"the token is signed by a key the issuer does not publish (kid={kid!r})")
        return found

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def _refresh(self, force: bool) -> None:
        async with self._lock:
            if not force and time.monotonic() - self._fetched_at < self.min_refresh_s:
                return  # another request refreshed while this one waited
            try:
                async with httpx.AsyncClient(transport=self._transport, timeout=self._timeout_s) as client:
                    if self._jwks_uri is None:
                        self._jwks_uri = await self._discover(client)
                    response = await client.get(self._jwks_uri)
                    response.raise_for_status()
                    jwks = response.json()
            except (httpx.HTTPError, ValueError) as e:
                raise IssuerUnavailable(f"cannot fetch the keys of {self.issuer}: {e}") from e
            self.fetches += 1
            keys = {}
            for entry in jwks.get("keys", []):
                if entry.get("use", "sig") != "sig" or "kid" not in entry:
                    continue
                try:
                    keys[entry["kid"]] = jwt.PyJWK(entry)
                except jwt.PyJWKError:
                    continue  # a key type or algorithm this build cannot use
            self._keys, self._fetched_at = keys, time.monotonic()

    async def _discover(self, client: httpx.AsyncClient) -> str:
        response = await client.get(discovery_url(self.issuer))
        response.raise_for_status()
        doc = response.json()
        if doc.get("issuer", "").rstrip("/") != self.issuer:
            raise ValueError(f"the discovery document names issuer {doc.get('issuer')!r}, not {self.issuer!r}")
        return doc["jwks_uri"]


@dataclass(frozen=True)
class TokenPolicy:
    """How tokens of one issuer and audience become principals."""

    issuer: str
    audience: str
    kind: str = "oidc"  # or "workload"
    exact_audience: bool = False
    tenant_claim: str = "tenant"
    scopes_claim: str = "scope"
    fixed_scopes: frozenset[str] | None = None
    """Scopes every token of this policy gets (workload tokens carry none); None: read the claim."""
    default_tenant: str | None = None
    """Tenant when the claim is absent; None: such a token is refused."""
    leeway_s: float = 30.0


class TokenVerifier:
    def __init__(self, policies: list[TokenPolicy], *, transport: httpx.AsyncBaseTransport | None = None,
                 jwks_ttl_s: float = 3600.0, min_refresh_s: float = 10.0):
        self.policies = policies
        self.issuers = {p.issuer.rstrip("/"): IssuerKeys(p.issuer, jwks_ttl_s=jwks_ttl_s,
                                                         min_refresh_s=min_refresh_s, transport=transport)
                        for p in policies}

    async def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except Exception:  # noqa: BLE001 - pyjwt's errors, and json's on absurd nesting (RecursionError)
            raise TokenInvalid("the bearer token is not a well-formed JWT") from None
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise TokenInvalid(f"the token's algorithm {_shown(alg)} is not accepted")
        if kid is not None and not isinstance(kid, str):
            raise TokenInvalid("the token's key id (kid) is not a string")
        policy = self._policy(unverified)
        key = await self.issuers[policy.issuer.rstrip("/")].key(kid)
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg], audience=policy.audience, issuer=unverified["iss"],
                leeway=policy.leeway_s, options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenInvalid("the bearer token has expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenInvalid("the bearer token is not valid yet (nbf)") from None
        except jwt.InvalidAudienceError:
            raise TokenInvalid(f"the bearer token is not for this server's audience {policy.audience!r}") from None
        except jwt.InvalidSignatureError:
            raise TokenInvalid("the bearer token's signature does not verify") from None
        except jwt.PyJWTError as e:
            raise TokenInvalid(f"the bearer token is not valid: {_shown(str(e))}") from None
        except Exception as e:  # noqa: BLE001 - e.g. OverflowError for "exp": Infinity
            raise TokenInvalid(f"the bearer token is not valid ({type(e).__name__} in its claims)") from None
        return self._principal(policy, claims)

    def _policy(self, claims: dict[str, Any]) -> TokenPolicy:
        iss = claims.get("iss")
        if not isinstance(iss, str):
            raise TokenInvalid("the bearer token has no issuer (iss) string")
        candidates = [p for p in self.policies if p.issuer.rstrip("/") == iss.rstrip("/")]
        if not candidates:
            raise TokenInvalid(f"tokens from issuer {_shown(iss)} are not accepted")
        audiences = _audiences(claims)
        for policy in candidates:  # an exact (workload) match first, then any that holds the audience
            if policy.exact_audience and audiences == [policy.audience]:
                return policy
        for policy in candidates:
            if not policy.exact_audience and policy.audience in audiences:
                return policy
        wanted = " or ".join(repr(p.audience) for p in candidates)
        raise TokenInvalid(f"the bearer token's audience {_shown(audiences)} is not {wanted}")

    def _principal(self, policy: TokenPolicy, claims: dict[str, Any]) -> Principal:
        tenant = claim(claims, policy.tenant_claim)
        if tenant is None:
            tenant = policy.default_tenant
        if not isinstance(tenant, str) or not tenant:
            raise TokenInvalid(f"the bearer token has no tenant (claim {policy.tenant_claim!r})")
        subject = claims.get("sub", "unknown")
        if not isinstance(subject, str) or not subject:
            raise TokenInvalid("the bearer token's subject (sub) is not a string")
        if len(tenant) > MAX_NAME_CHARS or len(subject) > MAX_NAME_CHARS:
            raise TokenInvalid(f"the bearer token's tenant or subject is longer than {MAX_NAME_CHARS} characters")
        if policy.fixed_scopes is not None:
            scopes = policy.fixed_scopes
        else:
            raw = claim(claims, policy.scopes_claim)
            scopes = parse_scopes(raw if isinstance(raw, (str, list)) else "", strict=False)
        return Principal(subject=subject, tenant=tenant, scopes=scopes, kind=policy.kind)


def _audiences(claims: dict[str, Any]) -> list[str]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    if isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        return aud
    raise TokenInvalid("the bearer token's audience (aud) must be a string or a list of strings")


def _shown(value: Any) -> str:
    """A caller's value in a message, cut short (a claim may be megabytes)."""
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def claim(claims: dict[str, Any], path: str) -> Any:
    """A claim by name, or by a dotted path into nested objects; a name that holds dots itself
    (`kubernetes.io`) is matched whole first: `kubernetes.io.namespace` works."""
    if path in claims:
        return claims[path]
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if isinstance(claims.get(head), dict):
            return claim(claims[head], ".".join(parts[i:]))
    return None
