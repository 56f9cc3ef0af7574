"""Which remote ICE candidates the gateway will send connectivity checks to.

A remote candidate is an address the gateway will send STUN packets to on a user's say-so,
so without a policy the gateway is a UDP prober for anyone with a token. Refused: mDNS host
names, unspecified, link-local and multicast addresses, loopback (unless allowed), and the
ports the gateway itself depends on (its router and its targets, on their addresses). Loopback is allowed by
default only when every host address of the gateway is loopback: such a gateway can only
ever be reached from its own machine (the embedded default, tests, the benchmarks' stack).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable
from urllib.parse import urlsplit


@dataclass(frozen=True)
class CandidatePolicy:
    allow_loopback: bool
    protected_ports: frozenset[tuple[str, int]]  # (address, port) of the router and the targets

    @classmethod
    def for_gateway(cls, settings: Any, allow_loopback: bool | None,
                    router_url: str | None = None) -> "CandidatePolicy":
        if allow_loopback is None:
            allow_loopback = all(_is_loopback(a) for a in settings.host_addresses)
        return cls(allow_loopback, frozenset(_service_ports(settings, router_url or settings.router_url)))

    def refusal(self, ip: str, port: int) -> str | None:
        """Why a candidate at ip:port will not be checked, or None if it may be."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return "not an IP literal (mDNS names are not resolved)"
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.is_unspecified or address.is_multicast or address.is_link_local:
            return "an unspecified, multicast or link-local address"
        if address.is_loopback and not self.allow_loopback:
            return "a loopback address (allow_loopback_candidates is off)"
        if not 1 <= port <= 65535:
            return "port out of range"
        # With loopback allowed (a lab, or a gateway only its own machine reaches) loopback ports
        # are not singled out: the probing concern is accepted there, and a client's random UDP
        # port may well share a number with a local TCP service.
        if (str(address), port) in self.protected_ports and not (address.is_loopback and self.allow_loopback):
            return "a port of the gateway's own services"
        return None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _service_ports(settings: Any, router_url: str | None) -> Iterable[tuple[str, int]]:
    """The router the gateway dials and every target it fronts."""
    if router_url:
        parts = urlsplit(router_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        yield from _address_port(parts.hostname or "", port)
    for resource in settings.resources:
        yield from _address_port(resource.host, resource.port)


def _address_port(host: str, port: int) -> Iterable[tuple[str, int]]:
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # other host names are not resolved here
        return
    yield (str(address), port)
