"""API key administration (/admin/keys), live rate limits (/admin/rate-limits), both scope
admin, and the caller's identity (/auth/whoami)."""

from __future__ import annotations

from typing import Annotated

import dataclasses

from litestar import Controller, Request, delete, get, post, put
from litestar.params import Parameter

from ops.audit import audit_event
from serving.auth.access import Access
from serving.auth.guard import needs, principal_of
from serving.auth.key_store import KeyStoreUnavailable
from serving.auth.keys import ApiKeyRecord, new_key, parse_duration
from serving.auth.principal import ADMIN, AUTHENTICATED, parse_scopes
from serving.errors import APIError, bad_request
from serving.middleware import request_record
from serving.protocol.auth import CreatedKey, CreateKeyRequest, KeyInfo, KeyList, RateLimits, TenantLimits, WhoAmI
from serving.ratelimit.buckets import Limit
from serving.routes.common import ERROR_RESPONSES


class AdminKeysController(Controller):
    path = "/admin/keys"
    tags = ["Administration"]
    opt = needs(ADMIN)

    @post(operation_id="createApiKey", status_code=201, responses=ERROR_RESPONSES,
          summary="Create an API key; the key is in the answer once and never again")
    async def create(self, request: Request, data: CreateKeyRequest) -> CreatedKey:
        store = _store(request)
        try:
            scopes = parse_scopes(data.scopes)
            expires_in = parse_duration(data.expires_in) if data.expires_in else None
        except ValueError as e:
            raise bad_request(str(e), "scopes" if "scope" in str(e) else "expires_in") from None
        if not scopes:
            raise bad_request("a key needs at least one scope", "scopes")
        if not data.tenant.strip():
            raise bad_request("tenant must not be empty", "tenant")
        for name in ("rpm", "tpm"):
            if getattr(data, name) is not None and getattr(data, name) <= 0:
                raise bad_request(f"{name} must be > 0", name)
        caller = principal_of(request)
        key, record = new_key(data.tenant.strip(), sorted(scopes), expires_in_s=expires_in, name=data.name,
                              created_by=caller.subject, rpm=data.rpm, tpm=data.tpm)
        await _call(store.add(record))
        _audit(request, "key.create", record, scopes=record.scopes, expires_at=record.expires_at)
        return CreatedKey(key=key, info=_info(record))

    @get(operation_id="listApiKeys", summary="Every API key (never the keys themselves), oldest first")
    async def list_keys(self, request: Request,
                        tenant: Annotated[str | None, Parameter(description="only this tenant's keys")] = None
                        ) -> KeyList:
        return KeyList([_info(r) for r in await _call(_store(request).list(tenant))])

    @delete("/{key_id:str}", operation_id="revokeApiKey", status_code=200, responses=ERROR_RESPONSES,
            summary="Revoke an API key: it is refused from the next request on")
    async def revoke(self, request: Request, key_id: str) -> KeyInfo:
        record = await _call(_store(request).revoke(key_id))
        if record is None:
            raise APIError(404, f"no API key has the id {key_id!r}", param="key_id", code="key_not_found")
        _audit(request, "key.revoke", record)
        return _info(record)


class AdminRateLimitsController(Controller):
    """The limits in force, and a tenant's limits changed live (in this process: set
    `tenant_rate_limits` too, so a restart and the other replicas agree)."""

    path = "/admin/rate-limits"
    tags = ["Administration"]
    opt = needs(ADMIN)

    @get(operation_id="getRateLimits", summary="The rate limits in force")
    async def current(self, request: Request) -> RateLimits:
        limits = request.app.state["access"].limits
        return RateLimits(default=_limits(limits.tenant_default), per_key=_limits(limits.key_default),
                          tenants={t: _limits(x) for t, x in sorted(limits.tenants.items())})

    @put("/{tenant:str}", operation_id="setTenantRateLimits", status_code=200, responses=ERROR_RESPONSES,
         summary="Set one tenant's requests and tokens per minute (null: unlimited)")
    async def set_tenant(self, request: Request, tenant: str, data: TenantLimits) -> TenantLimits:
        for name in ("rpm", "tpm"):
            if getattr(data, name) is not None and getattr(data, name) <= 0:
                raise bad_request(f"{name} must be > 0 or null", name)
        access: Access = request.app.state["access"]
        before = access.limits.tenants.get(tenant, access.limits.tenant_default)
        access.limits = dataclasses.replace(access.limits, tenants={**access.limits.tenants,
                                                                    tenant: Limit(data.rpm, data.tpm)})
        caller = principal_of(request)
        audit_event("config.change", "success", actor=caller.subject, tenant=tenant, key_id=caller.key_id,
                    object=f"rate_limits:{tenant}", request_id=request_record(request.scope).request_id,
                    source=request.client.host if request.client else None,
                    changes={"rpm": [before.rpm, data.rpm], "tpm": [before.tpm, data.tpm]})
        return data


def _limits(limit: Limit) -> TenantLimits:
    return TenantLimits(rpm=limit.rpm, tpm=limit.tpm)


class AuthController(Controller):
    path = "/auth"
    tags = ["Identity"]

    @get("/whoami", operation_id="whoami", opt=needs(AUTHENTICATED),
         summary="The caller's subject, tenant and scopes (the CLI checks scopes with it before calling)")
    async def whoami(self, request: Request) -> WhoAmI:
        p = principal_of(request)
        access: Access = request.app.state["access"]
        return WhoAmI(subject=p.subject, tenant=p.tenant, scopes=sorted(p.scopes), kind=p.kind, key_id=p.key_id,
                      auth_enabled=access.enabled)


def _store(request: Request):
    store = request.app.state["access"].key_store
    if store is None:
        raise APIError(409, "auth is off on this server, so it keeps no API keys: start it with TESSERA_API_KEY "
                            "or --key-store", code="auth_disabled")
    return store


async def _call(awaitable):
    try:
        return await awaitable
    except KeyStoreUnavailable as e:
        raise APIError(503, f"the key store is unavailable: {e}", code="key_store_unavailable",
                       headers={"retry-after": "5"}) from None


def _info(record: ApiKeyRecord) -> KeyInfo:
    return KeyInfo(**{k: v for k, v in record.public().items() if k != "extra"})


def _audit(request: Request, action: str, record: ApiKeyRecord, **details) -> None:
    caller = principal_of(request)
    audit_event(action, "success", actor=caller.subject, tenant=record.tenant, key_id=record.key_id,
                object=f"key:{record.key_id}", request_id=request_record(request.scope).request_id,
                source=request.client.host if request.client else None, **details)
