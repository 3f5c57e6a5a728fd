"""Token and claim parsing never raises outside the 401/403 path: every header field and claim
is fuzzed over JSON's types, sizes and nestings, on tokens signed by the issuer's published key
and on badly signed ones. The verifier either returns a principal made of strings or refuses
with TokenInvalid; through the authenticator that is a 401 `invalid_token`."""

from __future__ import annotations

import asyncio
import json

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.auth.authenticator import Authenticator, Unauthenticated
from serving.auth.key_store import MemoryKeyStore
from serving.auth.oidc import TokenInvalid, TokenPolicy, TokenVerifier
from serving.auth.principal import SCOPES, Principal
from tests.helpers.fake_issuer import ISSUER, FakeIssuer, claims_payload

CLAIMS = ("iss", "aud", "sub", "exp", "nbf", "iat", "tenant", "scope")
HEADER_FIELDS = ("alg", "kid", "typ", "crit")
EXAMPLES = 150  # about 10 s on the 2-core development machine (RSA signing is most of it)

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.sampled_from(["tessera", ISSUER, "admin", "generate read", "", "x" * 200_000]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
# Nesting beyond what json's recursion allows: written as text, since json.dumps cannot make it either.
deep_nesting = st.integers(min_value=500, max_value=20_000).map(lambda d: "[" * d + "]" * d)


@st.composite
def tokens(draw, issuer: FakeIssuer, impostor) -> str:
    # Mostly one or two odd claims on an otherwise good token, so that parsing gets past the
    # first check; now and then an odd header or a claim nested past json's recursion limit.
    overrides = draw(st.dictionaries(st.sampled_from(CLAIMS), json_values, min_size=1, max_size=2))
    deep = draw(st.dictionaries(st.sampled_from(CLAIMS), deep_nesting, max_size=1)) if draw(st.integers(0, 7)) == 0 else {}
    header = draw(st.dictionaries(st.sampled_from(HEADER_FIELDS), json_values, max_size=1)) if draw(
        st.integers(0, 3)) == 0 else {}
    payload = claims_payload(overrides, deep)
    signer = draw(st.sampled_from(["issuer", "issuer", "impostor", "tampered"]))
    # The impostor's key was never published; it signs under the published kid.
    token = issuer.sign_raw(payload, header, key=impostor if signer == "impostor" else None)
    return token[:-4] + "AAAA" if signer == "tampered" else token


ISSUER_KEYS = FakeIssuer()
IMPOSTOR = rsa.generate_private_key(public_exponent=65537, key_size=2048)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(token=tokens(ISSUER_KEYS, IMPOSTOR))
def test_any_claims_give_a_principal_of_strings_or_token_invalid(token):
    verifier = TokenVerifier([TokenPolicy(ISSUER, "tessera", leeway_s=0)],
                             transport=httpx.MockTransport(ISSUER_KEYS.handler))
    authenticator = Authenticator(MemoryKeyStore(), verifier)

    async def check() -> None:
        try:
            principal = await verifier.verify(token)
        except TokenInvalid:
            principal = None
        if principal is not None:
            assert isinstance(principal, Principal) and isinstance(principal.tenant, str) and principal.tenant
            assert isinstance(principal.subject, str) and principal.scopes <= set(SCOPES)
        try:
            assert await authenticator.authenticate(f"Bearer {token}") == principal
        except Unauthenticated as e:
            assert principal is None and e.code == "invalid_token"

    asyncio.run(check())


def test_the_reported_cases():
    """The two 500s the issue found, and their neighbours, one by one."""
    verifier = TokenVerifier([TokenPolicy(ISSUER, "tessera", leeway_s=0)],
                             transport=httpx.MockTransport(ISSUER_KEYS.handler))
    cases = {
        "integer aud, bad signature": ISSUER_KEYS.sign_raw(claims_payload({"aud": 7}, {}), key=IMPOSTOR),
        "alg a list": ISSUER_KEYS.sign_raw(claims_payload({}, {}), {"alg": ["RS256"]}),
        "exp Infinity, signed": ISSUER_KEYS.sign_raw(claims_payload({"exp": float("inf")}, {})),
        "aud nested 5,000 deep": ISSUER_KEYS.sign_raw(claims_payload({}, {"aud": "[" * 5000 + "]" * 5000})),
        "kid a list": ISSUER_KEYS.sign_raw(claims_payload({}, {}), {"kid": ["k1"]}),
        "sub an object": ISSUER_KEYS.sign_raw(claims_payload({"sub": {"a": 1}}, {})),
    }
    for name, token in cases.items():
        try:
            asyncio.run(verifier.verify(token))
        except TokenInvalid:
            continue
        raise AssertionError(f"{name}: accepted")
    nested_scope = asyncio.run(verifier.verify(ISSUER_KEYS.sign_raw(claims_payload({"scope": [["admin"], "read"]}, {}))))
    assert nested_scope.scopes == {"read"}  # a non-string scope is ignored, never admin
