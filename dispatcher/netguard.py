"""Which addresses a webhook may reach: never private, loopback or link-local ones.

The check runs on the address actually connected to, inside the HTTP client's resolver,
so a DNS answer that changes between subscription and delivery cannot slip through.
``DISPATCHER_ALLOW_PRIVATE_TARGETS`` lists CIDRs exempted (e.g. loopback in tests).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from dispatcher.settings import IPNetwork


class BlockedAddress(OSError):
    """Every address the host resolves to is one that webhooks may not reach."""


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")


def is_blocked(address: str, allowed: Sequence[IPNetwork]) -> bool:
    """Whether ``address`` is off limits: not globally routable and not allowed.

    IPv6 forms that carry an IPv4 address (mapped, NAT64, 6to4) are judged by that
    IPv4 address; deprecated site-local addresses are blocked.
    """
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(
        address.split("%", 1)[0]
    )
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _SITE_LOCAL and not any(ip in net for net in allowed):
            return True
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
    if any(ip in net for net in allowed):
        return False
    return not ip.is_global or ip.is_multicast


class GuardedResolver(AbstractResolver):
    """Resolves as usual, then drops blocked addresses; none left raises BlockedAddress."""

    def __init__(self, allowed: Sequence[IPNetwork], inner: AbstractResolver | None = None):
        self._allowed = tuple(allowed)
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        kept = [r for r in results if not is_blocked(r["host"], self._allowed)]
        if not kept:
            shown = ", ".join(sorted({r["host"] for r in results}))
            raise BlockedAddress(
                f"{host} resolves only to private, loopback or link-local addresses ({shown})"
            )
        return kept

    async def close(self) -> None:
        await self._inner.close()


async def check_host(host: str, port: int, allowed: Sequence[IPNetwork]) -> None:
    """Raise BlockedAddress (or OSError if it does not resolve) for a forbidden host."""
    resolver = GuardedResolver(allowed)
    try:
        await resolver.resolve(host, port, socket.AF_UNSPEC)
    finally:
        await resolver.close()
