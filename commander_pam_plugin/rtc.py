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
import ipaddress
import logging
import time
from typing import Any, Iterable, Sequence

import aioice.ice
import aioice.stun
import aiortc.rtcicetransport
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

from . import idle_consent, sctp_tuning

DEFAULT_HOST_ADDRESSES = ("127.0.0.1",)

_host_addresses: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "pam_ice_host_addresses", default=None)
_original_get_host_addresses = aioice.ice.get_host_addresses


def _policy_get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    """aioice's gatherer asks this; inside gather_with_addresses() it answers our list."""
    chosen = _host_addresses.get()
    if chosen is None:
        return _original_get_host_addresses(use_ipv4=use_ipv4, use_ipv6=use_ipv6)
    return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]


# Two overrides of aioice 0.13.0's Connection, each guarded by the sha256 of the method it was
# written against (any other aioice keeps its stock behaviour for that method):
#
# 1. connect() starts a check, sleeps 20 ms (the RFC 8445 pacing timer Ta) and only then looks
#    whether the check list has finished. On loopback the first check succeeds in about 1 ms, so
#    each side noticed ~20 ms late: three quarters of a local connect. We keep the pacing between
#    checks but let connect() wait on the check list's outcome itself.
# 2. query_consent() gives up after CONSENT_FAILURES unanswered STUN checks. Under load (50 busy
#    tunnels on 2 cores) the answers queue behind data and healthy sessions were torn down. A peer
#    whose data arrived within the last check interval is alive: a missed answer then does not
#    count. A dead peer sends nothing, so it is still noticed in about 2.7 s.
CHECK_PACING_S = 0.02
CONSENT_INTERVAL_S = 0.5
CONSENT_FAILURES = 3
_KNOWN_SOURCES = {
    "connect": "da51be46190141ee23c03ab8d77c030b45e412b6430369790ba4665a7a7886d2",
    "query_consent": "fe49173a650a378a4198daa132fe61cbc449974c0011e12db2854dd971367b2e",
}


@functools.lru_cache(maxsize=None)
def override_supported(method: str) -> bool:
    """True when the installed aioice's `method` is the one our override was written for."""
    try:
        source = inspect.getsource(getattr(aioice.ice.Connection, method))
    except (OSError, TypeError, AttributeError):
        return False
    return hashlib.sha256(source.encode()).hexdigest() == _KNOWN_SOURCES[method]


class PamConnection(aioice.ice.Connection):
    """aioice's Connection: connect() returns as soon as the check list completes, and traffic
    from the peer counts as consent."""

    _pacer: asyncio.Task[None] | None = None
    _last_data = 0.0

    def _check_periodic(self) -> bool:
        """connect()'s pacing step: once pairs exist, pace on a task and let connect() wait on the outcome."""
        more = super()._check_periodic()
        if more and self._check_list and self._pacer is None and override_supported("connect"):
            self._pacer = asyncio.ensure_future(self._pace())
            return False  # connect() now awaits _check_list_state: completion is seen at once
        return more

    async def _pace(self) -> None:
        """The rest of the checks, one every CHECK_PACING_S, as stock connect() would start them."""
        while True:
            await asyncio.sleep(CHECK_PACING_S)  # RFC 8445 pacing between checks, not a wait for them
            if not aioice.ice.Connection._check_periodic(self):
                return

    def data_received(self, data: bytes, component: int) -> None:
        self._last_data = time.monotonic()
        super().data_received(data, component)

    async def query_consent(self) -> None:
        """RFC 7675 consent freshness, where recent traffic from the peer also proves it is there."""
        if not override_supported("query_consent"):
            return await super().query_consent()
        assert self.remote_password is not None
        failures = 0
        while True:
            await asyncio.sleep(idle_consent.tick_s(CONSENT_INTERVAL_S, failures, self))
            if not idle_consent.check_due(self, failures):  # idle sessions: rarely (idle_consent.py)
                continue
            for pair in self._nominated.values():
                request = self.build_request(pair, nominate=False)
                try:
                    await pair.protocol.request(request, pair.remote_addr,
                                                integrity_key=self.remote_password.encode("utf8"),
                                                retransmissions=0)
                    failures = 0
                    idle_consent.answered(self)
                except aioice.stun.TransactionError:
                    recently_heard = time.monotonic() - self._last_data < CONSENT_INTERVAL_S * 1.5
                    failures = 0 if recently_heard else failures + 1
                if failures >= CONSENT_FAILURES:
                    self._query_consent_task = None
                    return await self.close()


def install() -> None:
    """Patch aioice once per process: address policy, prompt connect, faster consent that counts traffic."""
    for name in ("aioice", "aiortc"):  # their INFO lines (every ICE check) are noise in a shell
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)
    aioice.ice.get_host_addresses = _policy_get_host_addresses
    aioice.ice.CONSENT_INTERVAL = CONSENT_INTERVAL_S  # stock query_consent, if our override is off
    aioice.ice.CONSENT_FAILURES = CONSENT_FAILURES
    if aiortc.rtcicetransport.Connection is aioice.ice.Connection:
        aiortc.rtcicetransport.Connection = PamConnection  # what RTCIceGatherer builds
    sctp_tuning.install()  # leaner SCTP/DTLS per packet; PAM_SCTP_TUNING=0 builds the stock ones


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
