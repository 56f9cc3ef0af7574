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
import socket
import time
from typing import Any, Callable, Iterable, Sequence

import aioice
import aioice.candidate
import aioice.ice
import aioice.stun
import aiortc.rtcicetransport
from aiortc import (RTCConfiguration, RTCIceServer, RTCIceTransportPolicy, RTCPeerConnection,
                    RTCSessionDescription)
from aiortc.rtcicetransport import candidate_from_aioice

from . import dtls_certificate, idle_consent, sctp_tuning

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
    # The trickle override (3.) relies on all three of these.
    "gather_candidates": "d33db28d4d1e49ffe863eb34098e4a4a73a7cc5725e0da821e1fb94d7ade8cbb",
    "get_component_candidates": "118597a9fcb703f9950c2f2964e3e44423724576eda484ba6747b1610ccf4a2f",
    "_remote_candidates_expected": "198a141bcd262d1317d4082081eee08df67d0743fe020008ff5af61758192762",
    # One-sided consent (4.) relies on request_received calling check_incoming only once a
    # request is authenticated (USERNAME and MESSAGE-INTEGRITY checked).
    "request_received": "dcdc9a3862c1a0b4d20d99c8836f3246d6214045056a4923bdfd9ff26bb8bbf2",
}
# 3. gather_candidates() (and so aiortc's setLocalDescription) waits for every STUN and TURN
#    server, 5 s for one that does not answer. We gather host candidates at once and let
#    server-reflexive and relay candidates follow on a task ("late" candidates, trickled by the
#    caller); ICE does not declare failure while that task may still add a pair.
# 4. Each authenticated check from the peer is counted (check_incoming), so that the ICE-controlled
#    side can leave consent checks to the controlling one while they arrive (idle_consent.py).
LATE_GATHER_TIMEOUT_S = 5.0  # aioice's own bound for a STUN/TURN answer
TRICKLE_METHODS = ("gather_candidates", "get_component_candidates", "_remote_candidates_expected")
POLICIES = ("all", "relay")
log = logging.getLogger(__name__)


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
    _late: asyncio.Task[None] | None = None  # server-reflexive / relay gathering still running

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._late_found: list[aioice.Candidate] = []
        self._late_watchers: list[Callable[[aioice.Candidate | None], None]] = []
        idle_consent.latch(self)

    # --- trickle: gathering that never waits on a STUN/TURN server ---------------------------

    async def gather_candidates(self) -> None:
        """Host candidates now; server-reflexive and relay ones on a task that never delays the caller."""
        servers = self.stun_server is not None or self.turn_server is not None
        if not servers or self._local_candidates_start or not all(map(override_supported, TRICKLE_METHODS)):
            return await super().gather_candidates()
        stun_server, turn_server = self.stun_server, self.turn_server
        self.stun_server = self.turn_server = None
        try:
            await super().gather_candidates()  # host only (none with the relay policy): ~1 ms
        finally:
            self.stun_server, self.turn_server = stun_server, turn_server
        self._late = asyncio.ensure_future(self._gather_late())
        if not self._local_candidates:
            # aiortc starts ICE only if a local candidate exists when the remote description is
            # applied. With no host candidate (relay policy) the first relayed one is the
            # earliest any path can exist, so wait for it (or the end of gathering), no longer.
            progress = asyncio.get_running_loop().create_future()
            self._late_watchers.append(lambda _c: progress.done() or progress.set_result(None))
            await progress

    @property
    def gathering_late(self) -> bool:
        """True while server-reflexive or relay candidates may still be found."""
        return self._late is not None

    def watch_late_candidates(self, callback: Callable[[aioice.Candidate | None], None]) -> None:
        """callback(candidate) for each late candidate (those found so far first), then callback(None)."""
        for candidate in self._late_found:
            callback(candidate)
        if self._late is None:
            callback(None)
        else:
            self._late_watchers.append(callback)

    async def _gather_late(self) -> None:
        tasks: list[asyncio.Task[Any]] = []
        if self.stun_server is not None:
            for protocol in list(self._protocols):
                if ipaddress.ip_address(protocol.local_candidate.host).version == 4:
                    tasks.append(asyncio.ensure_future(_server_reflexive(protocol, self.stun_server)))
        if self.turn_server is not None:
            for component in sorted(self._components):
                tasks.append(asyncio.ensure_future(aioice.ice.relayed_candidate(
                    component=component,
                    hide_related_address=self._transport_policy == aioice.ice.TransportPolicy.RELAY,
                    protocol_factory=lambda: aioice.ice.StunProtocol(self), turn_server=self.turn_server,
                    turn_username=self.turn_username, turn_password=self.turn_password,
                    turn_ssl=self.turn_ssl, turn_transport=self.turn_transport)))
        try:
            for finished in asyncio.as_completed(tasks, timeout=LATE_GATHER_TIMEOUT_S):
                try:
                    candidate, relay_protocol = await finished
                except asyncio.TimeoutError:
                    raise
                except Exception as exc:  # a server that refuses or is unreachable: skip it
                    log.debug("ICE server gave no candidate: %s", exc.__class__.__name__)
                    continue
                self._add_late(candidate, relay_protocol)
        except asyncio.TimeoutError:
            log.debug("an ICE server did not answer within %g s", LATE_GATHER_TIMEOUT_S)
        finally:
            for task in tasks:
                task.cancel()
            self._late = None
            watchers, self._late_watchers = self._late_watchers, []
            for watcher in watchers:
                watcher(None)
            if self._early_checks_done and not self._check_list_done and not self._closing:
                self._check_list_maybe_fail()  # the last pair may have failed while we gathered

    def _add_late(self, candidate: aioice.Candidate, relay_protocol: Any) -> None:
        if self._closing:
            if relay_protocol is not None:
                asyncio.ensure_future(relay_protocol.close())
            return
        self._local_candidates.append(candidate)
        if relay_protocol is not None:
            self._protocols.append(relay_protocol)
            if self._early_checks_done:  # connect() already paired: pair the new base now
                for remote in self._remote_candidates:
                    self._pair_remote_candidate(remote)
                self.sort_check_list()
        self._late_found.append(candidate)
        for watcher in list(self._late_watchers):
            watcher(candidate)

    def _remote_candidates_expected(self) -> bool:
        """Also while local gathering may add a pair: ICE must not fail (nor stop pacing) before it."""
        return super()._remote_candidates_expected() or self._late is not None

    async def close(self) -> None:
        if self._late is not None:
            self._late.cancel()
        await super().close()

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

    @property
    def counts_peer_checks(self) -> bool:
        """Whether authenticated checks from the peer are counted (idle_consent's listener role)."""
        return override_supported("request_received") and override_supported("query_consent")

    def check_incoming(self, message: aioice.stun.Message, addr: tuple[str, int], protocol: Any) -> None:
        """An authenticated check from the peer (request_received verified it): the peer is there."""
        idle_consent.peer_checked(self)
        super().check_incoming(message, addr, protocol)

    async def query_consent(self) -> None:
        """RFC 7675 consent freshness, where recent traffic from the peer also proves it is there."""
        if not override_supported("query_consent"):
            return await super().query_consent()
        assert self.remote_password is not None
        failures = 0
        while True:
            await idle_consent.wait(idle_consent.tick_s(CONSENT_INTERVAL_S, failures, self), self)
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


async def _server_reflexive(protocol: Any, server: tuple[str, int]) -> tuple[aioice.Candidate, None]:
    """aioice's server_reflexive_candidate, without its executor round trip for an IP literal
    (starting a resolver thread cost ~5 ms of a 20 ms loopback connect)."""
    host, port = server
    try:
        ipaddress.ip_address(host)
    except ValueError:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=socket.AF_INET,
                                                             type=socket.SOCK_DGRAM)
        host = infos[0][4][0]
    request = aioice.stun.Message(message_method=aioice.stun.Method.BINDING, message_class=aioice.stun.Class.REQUEST)
    response, _ = await protocol.request(request, (host, port))
    base = protocol.local_candidate
    mapped = response.attributes["XOR-MAPPED-ADDRESS"]
    return aioice.Candidate(foundation=aioice.candidate.candidate_foundation("srflx", "udp", base.host),
                            component=base.component, transport=base.transport,
                            priority=aioice.candidate.candidate_priority(base.component, "srflx"),
                            host=mapped[0], port=mapped[1], type="srflx",
                            related_address=base.host, related_port=base.port), None


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
    dtls_certificate.install()  # one DTLS certificate per process; PAM_SHARED_CERT=0: one per peer


def check_host_addresses(addresses: Iterable[str], allow_empty: bool = False) -> tuple[str, ...]:
    """Normalise and validate a host-address list; refuse wildcards (they are not candidates).

    allow_empty: the relay policy gathers no host candidate, so it needs no address."""
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
    if not result and not allow_empty:
        raise ValueError("at least one ICE host address is needed (or ice_transport_policy = \"relay\")")
    return tuple(result)


def check_policy(value: Any) -> str:
    """'all' (host, server-reflexive and relay candidates) or 'relay' (relay candidates only)."""
    if value not in POLICIES:
        raise ValueError(f"must be one of {', '.join(POLICIES)}, got {value!r}")
    return str(value)


def ice_servers_from_config(entries: Sequence[Any] | None) -> list[RTCIceServer]:
    """Config entries (URL strings or {urls, username, credential}) as RTCIceServer; [] by default.

    Each URL must be stun:, turn: or turns: (aiortc's own parser decides), and a TURN URL needs
    a username and credential: a typo fails here, not as a silent missing candidate later."""
    servers: list[RTCIceServer] = []
    for entry in entries or []:
        if isinstance(entry, str):
            server = RTCIceServer(urls=entry)
        elif isinstance(entry, dict) and entry.get("urls"):
            server = RTCIceServer(urls=entry["urls"], username=entry.get("username"),
                                  credential=entry.get("credential"))
        else:
            raise ValueError(f"ICE server entry must be a URL or {{urls, username, credential}}: {entry!r}")
        for url in server.urls if isinstance(server.urls, list) else [server.urls]:
            try:
                parsed = aiortc.rtcicetransport.parse_stun_turn_uri(str(url))
            except ValueError:
                raise ValueError(f"not a stun:, turn: or turns: URL: {str(url)[:80]!r}") from None
            if parsed["scheme"] in ("turn", "turns") and not (server.username and server.credential):
                raise ValueError(f"{parsed['scheme']}:{parsed['host']} needs a username and credential")
        servers.append(server)
    return servers


def new_peer_connection(ice_servers: Sequence[RTCIceServer] = (), policy: str = "all") -> RTCPeerConnection:
    """A peer connection with an explicit (possibly empty) ICE server list, never aiortc's default."""
    install()
    transport_policy = RTCIceTransportPolicy.RELAY if check_policy(policy) == "relay" else RTCIceTransportPolicy.ALL
    return RTCPeerConnection(RTCConfiguration(iceServers=list(ice_servers), iceTransportPolicy=transport_policy))


async def set_local_description(pc: RTCPeerConnection, description: RTCSessionDescription,
                                host_addresses: Sequence[str]) -> None:
    """setLocalDescription, gathering host candidates only on the given addresses."""
    token = _host_addresses.set(tuple(host_addresses))
    try:
        await pc.setLocalDescription(description)
    finally:
        _host_addresses.reset(token)


def ice_connection(pc: RTCPeerConnection) -> aioice.ice.Connection | None:
    """The aioice connection under the data channels (one: everything is bundled on SCTP)."""
    try:
        return pc.sctp.transport.transport.iceGatherer._connection  # type: ignore[union-attr]
    except AttributeError:
        return None


def gathering_late(pc: RTCPeerConnection) -> bool:
    """True while server-reflexive or relay candidates may still be found for this peer."""
    connection = ice_connection(pc)
    return isinstance(connection, PamConnection) and connection.gathering_late


def local_description_sdp(pc: RTCPeerConnection) -> str:
    """The local SDP to send: without end-of-candidates while late candidates may still follow."""
    sdp = pc.localDescription.sdp
    if gathering_late(pc):
        sdp = "".join(line for line in sdp.splitlines(keepends=True) if line.strip() != "a=end-of-candidates")
    return sdp


def watch_late_candidates(pc: RTCPeerConnection, callback: Callable[[dict[str, Any] | None], None]) -> None:
    """callback(wire candidate) for each late candidate, then callback(None) once gathering ends
    (at once if nothing is pending). Runs on the peer's loop."""
    from .protocol import candidate_to_wire

    connection = ice_connection(pc)
    if not isinstance(connection, PamConnection):
        callback(None)
        return
    mid = getattr(pc.sctp, "mid", None) or "0"

    def relay(candidate: aioice.Candidate | None) -> None:
        callback(None if candidate is None else candidate_to_wire(candidate_from_aioice(candidate), mid))

    connection.watch_late_candidates(relay)


def selected_pair_types(pc: RTCPeerConnection) -> tuple[str, str] | None:
    """(local type, remote type) of the nominated pair, e.g. ("relay", "host"); None before ICE connects."""
    connection = ice_connection(pc)
    nominated = getattr(connection, "_nominated", None) or {}
    pair = nominated.get(1)
    if pair is None:
        return None
    return pair.local_candidate.type, pair.remote_candidate.type
