"""Who is calling: the principal every authenticated request carries, and the scopes it may hold."""

from __future__ import annotations

from dataclasses import dataclass, field

ADMIN, READ, GENERATE, ADAPTER_MANAGER = "admin", "read", "generate", "adapter-manager"
SCOPES = (ADMIN, READ, GENERATE, ADAPTER_MANAGER)
# What a route may declare besides a scope: no credentials needed, or any valid credentials.
PUBLIC, AUTHENTICATED = "public", "authenticated"


@dataclass(frozen=True)
class Principal:
    subject: str
    """`key:<id>` for an API key, the token's `sub` for OIDC and workload tokens."""
    tenant: str
    scopes: frozenset[str] = field(default_factory=frozenset)
    kind: str = "api_key"
    """api_key, oidc, workload, or anonymous (auth off)."""
    key_id: str | None = None
    rpm: int | None = None
    """The key's own requests-per-minute limit (None: the server's per-key default)."""
    tpm: int | None = None

    def has(self, scope: str) -> bool:
        """admin holds every scope."""
        return scope in self.scopes or ADMIN in self.scopes

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.scopes


ANONYMOUS = Principal("anonymous", "default", frozenset(SCOPES), kind="anonymous")


def parse_scopes(text: str | list[str] | tuple[str, ...], *, strict: bool = True) -> frozenset[str]:
    """`generate,read` or `generate read` or a list -> scopes; unknown names are an error when strict
    (a key's scopes) and ignored otherwise (a token's `scope` claim holds `openid` and the like)."""
    items = text.replace(",", " ").split() if isinstance(text, str) else list(text)
    if strict and not all(isinstance(s, str) for s in items):
        raise ValueError("scopes must be strings")
    names = [s for s in items if isinstance(s, str)]  # a token's claim may hold anything: only names count
    unknown = sorted(set(names) - set(SCOPES))
    if strict and unknown:
        raise ValueError(f"unknown scopes {unknown}; scopes are {', '.join(SCOPES)}")
    return frozenset(s for s in names if s in SCOPES)
