"""Bodies of the key administration and identity endpoints."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct


class CreateKeyRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    tenant: str
    scopes: list[str]
    expires_in: str | None = None
    """A duration: `30d`, `12h`, `90m`, or seconds; unset: the key does not expire."""
    name: str | None = None
    rpm: int | None = None
    """The key's own requests-per-minute limit; unset: the server's per-key default."""
    tpm: int | None = None


class KeyInfo(Struct, kw_only=True):
    key_id: str
    tenant: str
    scopes: list[str]
    status: Literal["active", "expired", "revoked"]
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    name: str | None = None
    created_by: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    object: Literal["api_key"] = "api_key"


class CreatedKey(Struct, kw_only=True):
    key: str
    """The API key itself: shown once, never stored."""
    info: KeyInfo


class KeyList(Struct):
    data: list[KeyInfo]
    object: Literal["list"] = "list"


class TenantLimits(Struct, kw_only=True, forbid_unknown_fields=True):
    """A tenant's limits per minute; null: unlimited."""

    rpm: int | None = None
    tpm: int | None = None


class RateLimits(Struct, kw_only=True):
    default: TenantLimits
    """Every tenant not listed."""
    tenants: dict[str, TenantLimits]
    per_key: TenantLimits


class WhoAmI(Struct, kw_only=True):
    subject: str
    tenant: str
    scopes: list[str]
    kind: str
    key_id: str | None = None
    auth_enabled: bool = True
