"""An OpenID Connect issuer for tests, served through httpx.MockTransport: discovery, a JWKS of
RSA keys (rotatable), and tokens signed with them."""

from __future__ import annotations

import base64
import json
import time

import httpx
import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

ISSUER = "https://issuer.test"


class FakeIssuer:
    def __init__(self):
        self.keys = {"k1": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
        self.published = {"k1"}
        self.jwks_requests = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/.well-known/openid-configuration":
            return httpx.Response(200, json={"issuer": ISSUER, "jwks_uri": f"{ISSUER}/jwks"})
        self.jwks_requests += 1
        keys = []
        for kid in sorted(self.published):
            entry = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.keys[kid].public_key()))
            keys.append(entry | {"kid": kid, "use": "sig", "alg": "RS256"})
        return httpx.Response(200, json={"keys": keys})

    def token(self, kid="k1", **claims) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": "tessera", "sub": "svc", "tenant": "acme", "scope": "generate",
                "iat": now, "exp": now + 300} | claims
        return jwt.encode({k: v for k, v in body.items() if v is not None}, self.keys[kid], algorithm="RS256",
                          headers={"kid": kid})

    def sign_raw(self, payload: bytes, header: dict | None = None, kid: str = "k1", key=None) -> str:
        """An RS256 token over exactly these payload bytes and header fields (any JSON, which
        pyjwt's encoder would refuse to write), signed by `key` (default: the issuer's `kid`)."""
        head = json.dumps({"alg": "RS256", "typ": "JWT", "kid": kid, **(header or {})}).encode()
        signing_input = _b64(head) + b"." + _b64(payload)
        signature = (key or self.keys[kid]).sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return (signing_input + b"." + _b64(signature)).decode()


def claims_payload(overrides: dict, raw: dict[str, str]) -> bytes:
    """A good token's claims with `overrides`, plus claims whose JSON text is given as is in `raw`
    (nesting too deep for json.dumps to write)."""
    base = {"iss": ISSUER, "aud": "tessera", "sub": "svc", "tenant": "acme", "scope": "generate",
            "iat": 1_700_000_000, "exp": 4_000_000_000}
    text = json.dumps(base | overrides)[:-1]  # NaN and Infinity as Python's json writes them (pyjwt reads them)
    return (text + "".join(f', "{k}": {v}' for k, v in raw.items()) + "}").encode()


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")
