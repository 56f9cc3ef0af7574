"""aiortc settings shared by the client and the gateway: ICE servers, host addresses, liveness.

aiortc quietly adds a public STUN server when iceServers is None, and aioice skips loopback
addresses when it gathers host candidates. Both are wrong for a privileged-access tool that
must touch only the addresses it was told about, so every peer connection in this project is
built here, with an explicit server list and an explicit host-address list.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import inspect
import logging
import ipaddress
from typing import Any, Iterable, Sequence

import aioice.ice
import aiortc.rtcicetransport
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


# aioice's Connection.connect() starts a check, sleeps 20 ms (the RFC 8445 pacing timer Ta),
# and only then looks whether the check list has finished. On loopback the first check succeeds
# in about 1 ms, so each side notices ~20 ms late: three quarters of a local connect. The
# override below keeps the 20 ms pacing between checks but lets connect() wait on the check
# list's outcome itself. Written for aioice 0.13.0: it relies on connect() calling
# _check_periodic() in its pacing loop and then awaiting _check_list_state when the check list
# is not empty. The sha256 of connect()'s source guards that; any other aioice keeps stock pacing.
CHECK_PACING_S = 0.02
_KNOWN_CONNECT_SHA256 = "da51be46190141ee23c03ab8d77c030b45e412b6430369790ba4665a7a7886d2"


class PromptConnection(aioice.ice.Connection):
    """aioice's Connection whose connect() returns as soon as the check list completes."""

    _pacer: asyncio.Task[None] | None = None

    def _check_periodic(self) -> bool:
        """connect()'s pacing step: once pairs exist, pace on a task and let connect() wait on the outcome."""
        more = super()._check_periodic()
        if more and self._check_list and self._pacer is None:
            self._pacer = asyncio.ensure_future(self._pace())
            return False  # connect() now awaits _check_list_state: completion is seen at once
        return more

    async def _pace(self) -> None:
        """The rest of the checks, one every CHECK_PACING_S, as stock connect() would start them."""
        while True:
            await asyncio.sleep(CHECK_PACING_S)
            if not aioice.ice.Connection._check_periodic(self):
                return


@functools.lru_cache(maxsize=1)
def prompt_connect_supported() -> bool:
    """True when the installed aioice's connect() is the one PromptConnection was written for."""
    try:
        source = inspect.getsource(aioice.ice.Connection.connect)
    except (OSError, TypeError):
        return False
    return hashlib.sha256(source.encode()).hexdigest() == _KNOWN_CONNECT_SHA256


def install() -> None:
    """Patch aioice once per process: address policy hook, faster consent checks, prompt connect."""
    for name in ("aioice", "aiortc"):  # their INFO lines (every ICE check) are noise in a shell
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)
    aioice.ice.get_host_addresses = _policy_get_host_addresses
    aioice.ice.CONSENT_INTERVAL = CONSENT_INTERVAL_S
    aioice.ice.CONSENT_FAILURES = CONSENT_FAILURES
    if aiortc.rtcicetransport.Connection is aioice.ice.Connection and prompt_connect_supported():
        aiortc.rtcicetransport.Connection = PromptConnection  # what RTCIceGatherer builds


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
