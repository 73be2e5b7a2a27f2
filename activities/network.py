"""Which addresses an image download may connect to: a guard against server-side request forgery.

Whoever can start a rebuild names the image URL, and image servers answer with redirects; both are
untrusted. Without a guard the worker, on the hypervisor, fetches from loopback services, the cloud
metadata address or the management network, and error messages tell the caller what it found there.
So every address a connection would go to is checked after name resolution and before connecting,
on every redirect too: only globally routed addresses, plus the networks the operator allowed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import ResolveResult

from activities.errors import ImageSourceRefused

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``--allow-image-network`` values; a bad one is the operator's error, said at worker start."""
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


@dataclass(frozen=True)
class AddressPolicy:
    """Global unicast addresses are allowed; anything else only inside ``allowed`` networks."""

    allowed: tuple[IPNetwork, ...] = ()

    def refusal(self, address: str) -> str | None:
        """Why ``address`` may not be connected to, or None when it may."""
        ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self.allowed):
            return None
        if ip.is_loopback:
            return "a loopback address"
        if ip.is_link_local:
            return "a link-local address (cloud metadata services live there)"
        if ip.is_multicast or ip.is_unspecified or ip.is_reserved:
            return "not a unicast address"
        if not ip.is_global:
            return "a private or special-purpose address"
        return None

    def check(self, host: str, addresses: Sequence[str]) -> None:
        for address in addresses:
            if why := self.refusal(address):
                raise ImageSourceRefused(
                    f"image host {host} resolves to {address}, {why}; a worker fetches images only "
                    "from public addresses unless its operator allows the network "
                    "(rebuild-worker --allow-image-network CIDR)"
                )


class GuardedConnector(aiohttp.TCPConnector):
    """A connector that refuses to connect where the policy says no.

    The check sits where aiohttp turns a host into addresses (literal IPs included), so it holds for
    the first request, for each redirect, and for a name whose DNS answer changes between requests.
    """

    def __init__(self, policy: AddressPolicy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.policy = policy

    async def _resolve_host(
        self, host: str, port: int, traces: Sequence[Any] | None = None
    ) -> list[ResolveResult]:
        results = await super()._resolve_host(host, port, traces)
        self.policy.check(host, [result["host"] for result in results])
        return results
