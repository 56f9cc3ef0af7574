"""aiortc settings shared by the client and the gateway: ICE servers, host addresses, liveness.

aiortc quietly adds a public STUN server when iceServers is None, and aioice skips loopback
addresses when it gathers host candidates. Both are wrong for a privileged-access tool that
must touch only the addresses it was told about, so every peer connection in this project is
built here, with an explicit server list and an explicit host-address list.
"""
from __future__ import annotations

import contextvars
import logging
import ipaddress
from typing import Any, Iterable, Sequence

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

DEFAULT_HOST_ADDRESSES = ("127.0.0.1",)
# aioice's defaults notice a vanished peer after ~31 s; 1 s x 3 gives ~3.5 s.
CONSENT_INTERVAL_S = 1
CONSENT_FAILURES = 3

_host_addresses: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "pam_ice_host_addresses", default=None)
_original_get_host_addresses = aioice.ice.get_host_addresses


def _policy_get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    """aioice's gatherer asks this; inside gather_with_addresses() it answers our list."""
    chosen = _host_addresses.get()
    if chosen is None:
        return _original_get_host_addresses(use_ipv4=use_ipv4, use_ipv6=use_ipv6)
    return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]


def install() -> None:
    """Patch aioice once per process: address policy hook and faster consent checks."""
    for name in ("aioice", "aiortc"):  # their INFO lines (every ICE check) are noise in a shell
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)
    aioice.ice.get_host_addresses = _policy_get_host_addresses
    aioice.ice.CONSENT_INTERVAL = CONSENT_INTERVAL_S
    aioice.ice.CONSENT_FAILURES = CONSENT_FAILURES


def check_host_addresses(addresses: Iterable[str]) -> tuple[str, ...]:
    """Normalise and validate a host-address list; refuse wildcards (they are not candidates)."""
    result: list[str] = []
    for raw in addresses:
        try:
            address = ipaddress.ip_address(str(raw).strip())
        except ValueError:
            raise ValueError(f"not an IP address: {raw!r}") from None
        if address.is_unspecified:
            raise ValueError(f"{raw} is a wildcard, not an address a peer can reach")
        text = str(address)
        if text not in result:
            result.append(text)
    if not result:
        raise ValueError("at least one ICE host address is needed")
    return tuple(result)


def ice_servers_from_config(entries: Sequence[Any] | None) -> list[RTCIceServer]:
    """Config entries (URL strings or {urls, username, credential}) as RTCIceServer; [] by default."""
    servers: list[RTCIceServer] = []
    for entry in entries or []:
        if isinstance(entry, str):
            servers.append(RTCIceServer(urls=entry))
        elif isinstance(entry, dict) and entry.get("urls"):
            servers.append(RTCIceServer(urls=entry["urls"], username=entry.get("username"),
                                        credential=entry.get("credential")))
        else:
            raise ValueError(f"ICE server entry must be a URL or {{urls, username, credential}}: {entry!r}")
    return servers


def new_peer_connection(ice_servers: Sequence[RTCIceServer] = ()) -> RTCPeerConnection:
    """A peer connection with an explicit (possibly empty) ICE server list, never aiortc's default."""
    install()
    return RTCPeerConnection(RTCConfiguration(iceServers=list(ice_servers)))


async def set_local_description(pc: RTCPeerConnection, description: RTCSessionDescription,
                                host_addresses: Sequence[str]) -> None:
    """setLocalDescription, gathering host candidates only on the given addresses."""
    token = _host_addresses.set(tuple(host_addresses))
    try:
        await pc.setLocalDescription(description)
    finally:
        _host_addresses.reset(token)
