"""An operator's explicit exception to API-key auth: named routes, from named networks only.

verl's reward loop and slime's `remote_rm` post to a bare address with no headers (verl's
comes from its router: no query string either), so a service with an API key answers them
401. Instead of turning the key off for everything, the operator names the routes those
clients use and the networks they run in; every other route, and these routes from any other
address, still need the key. The service logs the exception at start-up.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The flag on the request scope that ApiKeyMiddleware reads.
KEYLESS = "keyless"


def parse_networks(values: Iterable[str]) -> list[Network]:
    """'10.0.0.0/8', '127.0.0.1', 'fd00::/8' -> networks; a bad one raises ValueError naming it."""
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP network (write it as 10.0.0.0/8, 127.0.0.1 or fd00::/8)") from None
    return out


def client_in(host: str | None, networks: Iterable[Network]) -> bool:
    """Pure: is the peer address `host` inside one of `networks`? (IPv4-mapped IPv6 counts as IPv4.)

    >>> client_in("10.1.2.3", parse_networks(["10.0.0.0/8"])), client_in("11.0.0.1", parse_networks(["10.0.0.0/8"]))
    (True, False)
    """
    if not host:
        return False
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:  # a unix socket or a test client's name: not an address we can place
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in networks)


class KeylessRoutesMiddleware:
    """Marks a request keyless when its path is one of `routes` and its peer address (the TCP
    peer, not a forwarded-for header a client could write) is inside one of `networks`.

    Runs outside ApiKeyMiddleware, which lets marked requests through without a key.
    """

    def __init__(self, app: ASGIApp, routes: Iterable[str], networks: Iterable[str]):
        self.app = app
        self.routes = frozenset(routes)
        self.networks = parse_networks(networks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.routes:
            client = scope.get("client")
            if client_in(client[0] if client else None, self.networks):
                scope.setdefault("state", {})[KEYLESS] = True
        await self.app(scope, receive, send)
