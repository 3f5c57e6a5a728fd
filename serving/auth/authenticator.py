"""Credentials -> a Principal: the bootstrap key, API keys from the store, OIDC and workload JWTs."""

from __future__ import annotations

import hmac
import logging
import secrets
import time

from serving.auth.key_store import KeyStoreUnavailable
from serving.auth.keys import PREFIX, hash_secret, split_key
from serving.auth.oidc import IssuerUnavailable, TokenInvalid, TokenVerifier
from serving.auth.principal import ADMIN, Principal

BOOTSTRAP_KEY_ID = "bootstrap"
log = logging.getLogger(__name__)


class Unauthenticated(Exception):
    """No valid credentials; `key_id` names the presented key when it could be parsed."""

    def __init__(self, message: str, *, key_id: str | None = None, code: str = "invalid_api_key"):
        super().__init__(message)
        self.key_id, self.code = key_id, code


class CredentialsUnverifiable(Exception):
    """The key store or the issuer cannot be reached, so the credentials cannot be checked (503)."""


class Authenticator:
    def __init__(self, store, verifier: TokenVerifier | None = None, bootstrap_key: str | None = None,
                 bootstrap_tenant: str = "default"):
        self.store, self.verifier, self.bootstrap_tenant = store, verifier, bootstrap_tenant
        # The bootstrap key is kept as a salted hash too, and compared in constant time.
        self._boot_salt = secrets.token_bytes(16)
        self._boot_hash = hash_secret(self._boot_salt, bootstrap_key) if bootstrap_key else None

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthenticated("no credentials: send an API key or a token as `Authorization: Bearer ...`",
                                  code="missing_credentials")
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise Unauthenticated("the Authorization header must be `Bearer <API key or token>`")
        if self._boot_hash is not None and hmac.compare_digest(
                hash_secret(self._boot_salt, credential), self._boot_hash):
            return Principal(f"key:{BOOTSTRAP_KEY_ID}", self.bootstrap_tenant, frozenset({ADMIN}),
                             key_id=BOOTSTRAP_KEY_ID)
        if credential.startswith(PREFIX):
            return await self._api_key(credential)
        if self.verifier is not None and credential.count(".") == 2:
            try:
                return await self.verifier.verify(credential)
            except TokenInvalid as e:
                raise Unauthenticated(str(e), code="invalid_token") from None
            except IssuerUnavailable as e:
                raise CredentialsUnverifiable(str(e)) from None
            except Exception:  # noqa: BLE001 - a token our parsing chokes on is still only a bad token
                log.exception("token verification failed unexpectedly")
                raise Unauthenticated("the bearer token is not valid", code="invalid_token") from None
        raise Unauthenticated("the API key is not valid")

    async def _api_key(self, key: str) -> Principal:
        parts = split_key(key)
        if parts is None:
            raise Unauthenticated("the API key is malformed")
        key_id, secret = parts
        try:
            record = await self.store.get(key_id)
        except KeyStoreUnavailable as e:
            raise CredentialsUnverifiable(str(e)) from None
        if record is None or not record.matches(secret):
            raise Unauthenticated("the API key is not valid", key_id=key_id)
        status = record.status(time.time())
        if status != "active":
            raise Unauthenticated(f"the API key has been {status}", key_id=key_id, code=f"{status}_api_key")
        return Principal(f"key:{key_id}", record.tenant, frozenset(record.scopes), key_id=key_id,
                         rpm=record.rpm, tpm=record.tpm)
