"""API keys: `tsk_<key id>_<secret>`, of which a store keeps the id, a salt and a salted hash.

The secret is 256 random bits, so a salted SHA-256 (an HMAC keyed by the salt) is as strong
as a slow password hash here and costs microseconds per request. The key id is public: it
names the key in listings, logs and audit lines; the secret is shown once, at creation.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import asdict, dataclass, field

PREFIX = "tsk_"
_KEY = re.compile(r"^tsk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


@dataclass
class ApiKeyRecord:
    key_id: str
    tenant: str
    scopes: list[str]
    salt: str  # hex
    hash: str  # hex HMAC-SHA256(salt, secret)
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    name: str | None = None
    created_by: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    extra: dict = field(default_factory=dict)

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(_digest(bytes.fromhex(self.salt), secret), self.hash)

    def status(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def public(self) -> dict:
        """The record without salt and hash, as listings show it."""
        data = asdict(self)
        del data["salt"], data["hash"]
        return data | {"status": self.status()}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ApiKeyRecord:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def new_key(tenant: str, scopes: list[str], *, expires_in_s: float | None = None, name: str | None = None,
            created_by: str | None = None, rpm: int | None = None, tpm: int | None = None
            ) -> tuple[str, ApiKeyRecord]:
    """(the key, shown once; the record a store keeps)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    now = time.time()
    record = ApiKeyRecord(
        key_id=key_id, tenant=tenant, scopes=sorted(scopes), salt=salt.hex(), hash=_digest(salt, secret),
        created_at=now, expires_at=now + expires_in_s if expires_in_s else None, name=name,
        created_by=created_by, rpm=rpm, tpm=tpm,
    )
    return f"{PREFIX}{key_id}_{secret}", record


def split_key(key: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key; None otherwise."""
    match = _KEY.match(key)
    return (match.group(1), match.group(2)) if match else None


def hash_secret(salt: bytes, secret: str) -> str:
    return _digest(salt, secret)


def _digest(salt: bytes, secret: str) -> str:
    return hmac.new(salt, secret.encode(), hashlib.sha256).hexdigest()


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """`30d`, `12h`, `90m`, `3600` -> seconds."""
    match = _DURATION.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration like 30d, 12h, 90m or 3600")
    return float(match.group(1)) * _UNIT_S[match.group(2)]
