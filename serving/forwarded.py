"""`X-Forwarded-*` believed only from configured proxies (the ingress that terminates TLS).

A client can send any `X-Forwarded-For`; only a proxy we trust appends to it honestly. So:

- the peer (the TCP connection's address) is not a trusted proxy: every `X-Forwarded-*`
  header is ignored and the peer is the client;
- the peer is trusted: `X-Forwarded-For` is read from the right, skipping trusted proxies;
  the first address that is not one is the client (addresses left of it were written by
  the client and are not believed). If every hop is trusted, the leftmost is the client.
  `X-Forwarded-Proto`, `-Host` and `-Port` are taken from the nearest proxy (their last value).

`resolve_forwarded(peer, headers, trusted)` is the pure function; `ForwardedHeadersMiddleware`
applies it to an ASGI scope (client, scheme, server, and the Host header), so everything
after it (rate limits by address, audit `source`, URLs) sees the real client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    """Addresses and networks whose `X-Forwarded-*` headers are believed; `*` trusts every peer."""

    networks: tuple[Network, ...] = ()
    trust_all: bool = False

    @classmethod
    def parse(cls, spec: str | Iterable[str] | None) -> TrustedProxies:
        """'10.0.0.0/8, 127.0.0.1, ::1' (or a list of such entries); empty or None trusts nobody."""
        items = spec.split(",") if isinstance(spec, str) else list(spec or ())
        networks, trust_all = [], False
        for item in (i.strip() for i in items):
            if not item:
                continue
            if item == "*":
                trust_all = True
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"trusted proxy {item!r} is not an IP address or network") from None
        return cls(tuple(networks), trust_all)

    def __contains__(self, address: str | None) -> bool:
        if self.trust_all:
            return True
        ip = _ip(address)
        return ip is not None and any(ip in net for net in self.networks)

    def __bool__(self) -> bool:
        return self.trust_all or bool(self.networks)


@dataclass(frozen=True, slots=True)
class ForwardedInfo:
    client: str | None  # the client's address
    scheme: str | None  # "https" when the ingress terminated TLS; None: as the connection says
    host: str | None  # the Host the client asked for; None: as the request says
    port: int | None
    via_proxy: bool  # the headers were believed


def resolve_forwarded(peer: str | None, headers: Mapping[str, str] | Sequence[tuple[str, str]],
                      trusted: TrustedProxies) -> ForwardedInfo:
    """What to believe about the client of a request that arrived from `peer`.

    `headers` maps lower-case names to values, or is a list of (name, value) pairs in which a
    repeated header is joined with commas (as HTTP says).
    """
    if peer is None or peer not in trusted:
        return ForwardedInfo(peer, None, None, None, via_proxy=False)
    values = _joined(headers)
    hops = [h.strip() for h in values.get("x-forwarded-for", "").split(",") if h.strip()]
    client = peer
    for hop in reversed(hops):
        address = _strip_port(hop)
        if _ip(address) is None:
            break  # "unknown" or garbage: believe no further
        client = address
        if address not in trusted:
            break
    scheme = _last(values.get("x-forwarded-proto"))
    scheme = scheme.lower() if scheme and scheme.lower() in ("http", "https", "ws", "wss") else None
    host = _last(values.get("x-forwarded-host"))
    port_text = _last(values.get("x-forwarded-port"))
    port = int(port_text) if port_text and port_text.isdigit() and 0 < int(port_text) < 65536 else None
    return ForwardedInfo(client, scheme, host or None, port, via_proxy=True)


class ForwardedHeadersMiddleware:
    """ASGI middleware: rewrites `client`, `scheme`, `server` and the Host header from trusted
    `X-Forwarded-*` headers, and drops those headers from untrusted peers."""

    def __init__(self, app, trusted: TrustedProxies | str | Iterable[str] | None):
        self.app = app
        self.trusted = trusted if isinstance(trusted, TrustedProxies) else TrustedProxies.parse(trusted)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = apply_forwarded(scope, self.trusted)
        await self.app(scope, receive, send)


def apply_forwarded(scope: dict, trusted: TrustedProxies) -> dict:
    """A copy of an ASGI scope with the forwarded view applied (the input is not changed)."""
    headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", ())]
    peer_host = (scope.get("client") or (None, None))[0]
    info = resolve_forwarded(peer_host, headers, trusted)
    scope = dict(scope)
    if not info.via_proxy:
        scope["headers"] = [(k, v) for k, v in scope.get("headers", ()) if not k.lower().startswith(b"x-forwarded-")]
        return scope
    if info.client != peer_host:
        scope["client"] = (info.client, 0)
    if info.scheme:
        websocket = scope["type"] == "websocket"
        scope["scheme"] = {"https": "wss", "http": "ws"}.get(info.scheme, info.scheme) if websocket else info.scheme
    if info.host:
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"host"] + [
            (b"host", info.host.encode("latin-1"))]
        name, host_port = _split_host(info.host)
        default = 443 if scope.get("scheme") in ("https", "wss") else 80
        scope["server"] = (name, info.port or host_port or default)
    elif info.port:
        scope["server"] = ((scope.get("server") or ("", 0))[0], info.port)
    return scope


def _joined(headers: Mapping[str, str] | Sequence[tuple[str, str]]) -> dict[str, str]:
    if isinstance(headers, Mapping):
        return {k.lower(): v for k, v in headers.items()}
    out: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def _last(value: str | None) -> str | None:
    if not value:
        return None
    return value.split(",")[-1].strip() or None


def _strip_port(hop: str) -> str:
    """'203.0.113.7:5123' -> '203.0.113.7'; '[2001:db8::1]:443' -> '2001:db8::1'."""
    if hop.startswith("["):
        return hop[1:hop.find("]")] if "]" in hop else hop
    if hop.count(":") == 1:
        return hop.split(":", 1)[0]
    return hop


def _split_host(host: str) -> tuple[str, int | None]:
    """'api.example.com:8443' -> ('api.example.com', 8443); '[2001:db8::1]' -> ('2001:db8::1', None)."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port = host.partition(":")
    return name, int(port) if port.isdigit() else None


def _ip(address: str | None):
    if not address:
        return None
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        return None
