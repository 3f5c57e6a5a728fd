"""Which buckets a request draws from, the decision, and OpenAI's `x-ratelimit-*` headers.

Every limit is a token bucket that holds up to a minute's allowance and refills at
limit/60 per second. A request needs one unit in each of its request buckets (and takes it)
and a positive level in each of its token buckets; its tokens are charged after it ran, from
its actual usage, which may take a token bucket below zero: later requests then wait until
it has refilled past zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from serving.auth.principal import Principal

REQUESTS, TOKENS = "requests", "tokens"


class RateLimiterUnavailable(Exception):
    """The shared state (Redis) cannot be reached."""


@dataclass(frozen=True)
class Bucket:
    name: str  # e.g. "tenant:acme:requests"
    kind: str  # REQUESTS or TOKENS
    capacity: float  # per minute

    @property
    def rate(self) -> float:
        return self.capacity / 60.0


@dataclass
class Decision:
    allowed: bool
    retry_after_s: float = 0.0
    levels: dict[Bucket, float] = field(default_factory=dict)
    """Each bucket's level after this request took its unit."""

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* for the tightest bucket of each kind."""
        out: dict[str, str] = {}
        for kind in (REQUESTS, TOKENS):
            mine = [(level, b) for b, level in self.levels.items() if b.kind == kind]
            if not mine:
                continue
            level, bucket = min(mine, key=lambda x: x[0])
            out[f"x-ratelimit-limit-{kind}"] = str(int(bucket.capacity))
            out[f"x-ratelimit-remaining-{kind}"] = str(max(int(math.floor(level)), 0))
            out[f"x-ratelimit-reset-{kind}"] = format_reset((bucket.capacity - level) / bucket.rate)
        if not self.allowed:
            out["retry-after"] = str(max(int(math.ceil(self.retry_after_s)), 1))
        return out


def format_reset(seconds: float) -> str:
    """OpenAI's form: `1s`, `6m0s`, `1h2m3s`, `120ms`."""
    seconds = max(seconds, 0.0)
    if seconds < 1:
        return f"{int(round(seconds * 1000))}ms"
    total = int(math.ceil(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass(frozen=True)
class Limit:
    rpm: int | None = None
    tpm: int | None = None


def parse_tenant_limits(text: str | None) -> dict[str, Limit]:
    """`acme=600:100000,beta=60:` -> per-tenant limits (requests/min:tokens/min, empty = none)."""
    limits: dict[str, Limit] = {}
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        tenant, sep, values = item.partition("=")
        rpm, colon, tpm = values.partition(":")
        try:
            limit = Limit(int(rpm) if rpm.strip() else None, int(tpm) if tpm.strip() else None)
        except ValueError:
            limit = None
        if not (sep and colon and tenant.strip()) or limit is None or any(
                v is not None and v <= 0 for v in (limit.rpm, limit.tpm)):
            raise ValueError(f"tenant_rate_limits: {item!r} must be tenant=RPM:TPM with positive integers "
                             "(either may be empty)")
        limits[tenant.strip()] = limit
    return limits


@dataclass(frozen=True)
class LimitPolicy:
    """The configured limits: a default per tenant, overrides by tenant, a default per key."""

    tenant_default: Limit = Limit()
    tenants: dict[str, Limit] = field(default_factory=dict)
    key_default: Limit = Limit()

    @property
    def enabled(self) -> bool:
        limits = [self.tenant_default, self.key_default, *self.tenants.values()]
        return any(x.rpm or x.tpm for x in limits)

    def buckets(self, principal: Principal) -> list[Bucket]:
        """The buckets a caller draws from; none for authenticated admins (operators must be able
        to act on a server that is being flooded). With auth off, the anonymous caller is limited."""
        if principal.is_admin and principal.kind != "anonymous":
            return []
        tenant = self.tenants.get(principal.tenant, self.tenant_default)
        who = principal.key_id or f"{principal.kind}:{principal.subject}"
        key = Limit(principal.rpm or self.key_default.rpm, principal.tpm or self.key_default.tpm)
        out = []
        for prefix, limit in ((f"tenant:{principal.tenant}", tenant), (f"key:{who}", key)):
            if limit.rpm:
                out.append(Bucket(f"{prefix}:{REQUESTS}", REQUESTS, float(limit.rpm)))
            if limit.tpm:
                out.append(Bucket(f"{prefix}:{TOKENS}", TOKENS, float(limit.tpm)))
        return out
