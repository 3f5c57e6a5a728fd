"""X-Forwarded-* is believed only from configured proxies; the ASGI middleware applies it."""

import asyncio

import pytest

from serving.forwarded import ForwardedHeadersMiddleware, TrustedProxies, apply_forwarded, resolve_forwarded

INGRESS = TrustedProxies.parse("10.0.0.0/8, 127.0.0.1, fd00::/8")


def test_untrusted_peer_headers_are_ignored():
    info = resolve_forwarded("203.0.113.9", {"x-forwarded-for": "1.2.3.4", "x-forwarded-proto": "https"}, INGRESS)
    assert (info.client, info.scheme, info.host, info.via_proxy) == ("203.0.113.9", None, None, False)


def test_trusted_proxy_gives_the_client():
    info = resolve_forwarded("10.1.2.3", {"X-Forwarded-For": "198.51.100.20", "X-Forwarded-Proto": "https",
                                          "X-Forwarded-Host": "api.example.com", "X-Forwarded-Port": "443"}, INGRESS)
    assert (info.client, info.scheme, info.host, info.port, info.via_proxy) == (
        "198.51.100.20", "https", "api.example.com", 443, True)


def test_spoofed_entries_left_of_the_first_untrusted_hop_are_not_believed():
    # The client sent "X-Forwarded-For: 10.9.9.9" itself; the ingress appended its real address.
    info = resolve_forwarded("10.1.2.3", [("x-forwarded-for", "10.9.9.9, 198.51.100.20")], INGRESS)
    assert info.client == "198.51.100.20"
    # Two trusted proxies in a chain (CDN edge then ingress): skipped from the right.
    info = resolve_forwarded("10.1.2.3", [("x-forwarded-for", "192.0.2.1, 198.51.100.20, 10.0.0.5")], INGRESS)
    assert info.client == "198.51.100.20"


def test_repeated_headers_are_joined_and_the_nearest_proto_wins():
    headers = [("x-forwarded-for", "192.0.2.1"), ("x-forwarded-for", "198.51.100.20"),
               ("x-forwarded-proto", "http"), ("x-forwarded-proto", "https")]
    info = resolve_forwarded("127.0.0.1", headers, INGRESS)
    assert (info.client, info.scheme) == ("198.51.100.20", "https")


def test_all_hops_trusted_gives_the_leftmost():
    assert resolve_forwarded("10.0.0.1", {"x-forwarded-for": "10.0.0.9, 10.0.0.8"}, INGRESS).client == "10.0.0.9"


def test_garbage_and_ports_and_ipv6():
    assert resolve_forwarded("10.0.0.1", {"x-forwarded-for": "unknown"}, INGRESS).client == "10.0.0.1"
    assert resolve_forwarded("10.0.0.1", {"x-forwarded-for": "x, 192.0.2.7:5123"}, INGRESS).client == "192.0.2.7"
    info = resolve_forwarded("fd00::1", {"x-forwarded-for": "[2001:db8::7]:443", "x-forwarded-proto": "gopher",
                                         "x-forwarded-port": "99999"}, INGRESS)
    assert (info.client, info.scheme, info.port) == ("2001:db8::7", None, None)


def test_parse():
    assert not TrustedProxies.parse("") and not TrustedProxies.parse(None)
    assert "198.51.100.1" in TrustedProxies.parse("*")
    assert "10.3.4.5" in INGRESS and "11.0.0.1" not in INGRESS and "fd00::abcd" in INGRESS and None not in INGRESS
    with pytest.raises(ValueError, match="trusted proxy 'ingress' is not an IP address or network"):
        TrustedProxies.parse("10.0.0.0/8,ingress")


def _scope(peer, headers, scheme="http"):
    return {"type": "http", "scheme": scheme, "client": (peer, 40000), "server": ("10.0.0.2", 8000),
            "headers": [(k.encode(), v.encode()) for k, v in headers]}


def test_scope_rewritten_for_a_trusted_proxy():
    scope = _scope("10.0.0.7", [("host", "tessera:8000"), ("x-forwarded-for", "198.51.100.20"),
                                ("x-forwarded-proto", "https"), ("x-forwarded-host", "api.example.com")])
    out = apply_forwarded(scope, INGRESS)
    assert out["client"] == ("198.51.100.20", 0) and out["scheme"] == "https"
    assert out["server"] == ("api.example.com", 443)
    assert (b"host", b"api.example.com") in out["headers"] and (b"host", b"tessera:8000") not in out["headers"]
    assert scope["client"] == ("10.0.0.7", 40000)  # the input is untouched


def test_scope_from_an_untrusted_peer_loses_the_headers():
    out = apply_forwarded(_scope("203.0.113.9", [("host", "h"), ("x-forwarded-for", "1.2.3.4"),
                                                 ("X-Forwarded-Proto", "https")]), INGRESS)
    assert out["client"] == ("203.0.113.9", 40000) and out["scheme"] == "http"
    assert out["headers"] == [(b"host", b"h")]


def test_middleware_passes_the_rewritten_scope():
    seen = {}

    async def app(scope, receive, send):
        seen.update(scope)

    middleware = ForwardedHeadersMiddleware(app, "127.0.0.1")
    asyncio.run(middleware(_scope("127.0.0.1", [("x-forwarded-for", "192.0.2.44")]), None, None))
    assert seen["client"] == ("192.0.2.44", 0)
    asyncio.run(middleware({"type": "lifespan"}, None, None))
    assert seen["type"] == "lifespan"
