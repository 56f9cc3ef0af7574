"""The client's aiortc peer: one connection to a gateway, its negotiated channels, its health.

Runs only on the plugin's background loop. Negotiated channels (control = 0, terminal = 1,
tunnel streams from 2) are created on both sides without the DCEP open round trip; the
control channel being open is the "data plane up" signal. A connection that closes without
being asked to is peer loss, reported once through `lost` and `lost_reason`.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Sequence

from aiortc import RTCDataChannel, RTCSessionDescription

from . import protocol, rtc

log = logging.getLogger(__name__)

# Flow control on bufferedAmount (PROTOCOL.md section 4).
HIGH_WATER = 1024 * 1024
LOW_WATER = 256 * 1024


class PeerLost(Exception):
    """The gateway peer went away (ICE consent expired, connection closed or failed)."""


class ClientPeer:
    """One RTCPeerConnection to a gateway (create it on the loop with `await ClientPeer.create()`)."""

    def __init__(self, ice_servers: Sequence[Any], host_addresses: Sequence[str], terminal: bool,
                 ice_transport_policy: str = "all") -> None:
        self.host_addresses = tuple(host_addresses)
        self.ice_servers = tuple(ice_servers)
        self.ice_transport_policy = ice_transport_policy
        self.pc = rtc.new_peer_connection(ice_servers, ice_transport_policy)
        self.control = self.pc.createDataChannel("control", negotiated=True, id=protocol.CONTROL_CHANNEL_ID)
        self.terminal: RTCDataChannel | None = None
        if terminal:
            self.terminal = self.pc.createDataChannel("terminal", negotiated=True,
                                                      id=protocol.TERMINAL_CHANNEL_ID)
        self.ready = asyncio.Event()
        self.lost = asyncio.Event()
        self._settled = asyncio.Event()  # ready or lost, whichever comes first
        self.lost_reason = ""
        self.ice_connected = asyncio.Event()
        self.ice_connected_callback: Callable[[], None] | None = None
        self._closing = False
        self.trickle_expected = False  # set by negotiation: the answer must come on the stream
        self._remote_applied = False
        self._early_candidates: list[dict[str, Any]] = []
        self._early_end = False
        self._gathering: asyncio.Task[None] | None = None
        self.late_expected = False  # server-reflexive/relay candidates follow the offer
        self._next_stream_id = protocol.FIRST_STREAM_ID
        self._streams: dict[int, RTCDataChannel] = {}
        self._control_handlers: list[Callable[[dict[str, Any]], None]] = []
        self.ended_by_gateway = False  # control 'ending': a final end, never healed
        self.control.on("open", self._on_ready)
        self.control.on("close", self._on_control_close)
        self.control.on("message", self._on_control_message)
        self.pc.on("connectionstatechange", self._on_state)
        self.pc.on("iceconnectionstatechange", self._on_ice_state)

    @classmethod
    async def create(cls, ice_servers: Sequence[Any], host_addresses: Sequence[str],
                     terminal: bool = False, ice_transport_policy: str = "all") -> "ClientPeer":
        return cls(ice_servers, host_addresses, terminal, ice_transport_policy)

    # --- offer / answer / candidates ------------------------------------------------------

    async def make_offer(self, gather_first: bool) -> str:
        """The offer SDP. gather_first: host candidates ride in the offer (gathering them takes ~1 ms;
        server-reflexive and relay ones follow through watch_late_candidates, and the offer then
        has no end-of-candidates); otherwise return at once and gather in the background
        (candidates via local_candidates())."""
        offer = await self.pc.createOffer()
        if gather_first:
            await self._describe(offer)
            return rtc.local_description_sdp(self.pc)
        self._gathering = asyncio.ensure_future(self._describe(offer))
        return offer.sdp

    async def _describe(self, offer: RTCSessionDescription) -> None:
        await rtc.set_local_description(self.pc, offer, self.host_addresses)
        # Read with no await in between: whether the candidates sent now are all there will be.
        self.late_expected = rtc.gathering_late(self.pc)

    async def local_candidates(self) -> list[dict[str, Any]]:
        """Every local candidate, once gathering has finished (wire shape)."""
        if self._gathering is not None:
            await self._gathering
        _, candidates, _ = protocol.split_sdp_candidates(self.pc.localDescription.sdp)
        return candidates

    async def watch_late_candidates(self, callback: Callable[[dict[str, Any] | None], None]) -> None:
        """callback(wire candidate) for each server-reflexive/relay candidate found after the offer,
        then callback(None); never called when gathering had ended with the offer (its
        candidates and end-of-candidates went out then)."""
        if self._gathering is not None:
            await self._gathering
        if self.late_expected:
            rtc.watch_late_candidates(self.pc, callback)

    async def apply_answer(self, sdp: str) -> None:
        protocol.validate_sdp(sdp, "answer")
        if self._gathering is not None:
            await self._gathering  # setRemoteDescription needs the local description in place
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        self._remote_applied = True
        early, self._early_candidates = self._early_candidates, []
        await self._add_candidates(early, self._early_end)

    async def add_remote_candidates(self, candidates: list[dict[str, Any]], end: bool) -> None:
        """Remote candidates; queued until the answer is applied (aiortc would drop them)."""
        if not self._remote_applied:
            self._early_candidates.extend(candidates)
            self._early_end = self._early_end or end
            return
        await self._add_candidates(candidates, end)

    async def _add_candidates(self, candidates: list[dict[str, Any]], end: bool) -> None:
        for wire in candidates:
            await self.pc.addIceCandidate(protocol.candidate_from_wire(wire))
        if end:
            await self.pc.addIceCandidate(None)

    # --- state ------------------------------------------------------------------------------

    def _on_ice_state(self) -> None:
        if self.pc.iceConnectionState in ("connected", "completed") and not self.ice_connected.is_set():
            self.ice_connected.set()
            if self.ice_connected_callback is not None:
                self.ice_connected_callback()

    def _on_control_close(self) -> None:
        if self.pc.iceConnectionState in ("closed", "failed"):
            self.mark_lost("the gateway stopped answering")  # ICE consent expired: killed or cut off
        else:
            self.mark_lost("the gateway closed the session")

    def _on_state(self) -> None:
        state = self.pc.connectionState
        if state == "failed":
            self.mark_lost("the connection to the gateway failed")
        elif state == "closed":
            self.mark_lost("the gateway stopped answering")

    def mark_lost(self, reason: str) -> None:
        if self._closing or self.lost.is_set():
            return
        self.lost_reason = reason
        self.lost.set()
        self._settled.set()
        log.debug("peer lost: %s", reason)

    async def wait_ready(self) -> None:
        """Until the control channel is open; PeerLost if the peer goes first."""
        await self._settled.wait()
        if not self.ready.is_set():
            raise PeerLost(self.lost_reason)

    def _on_ready(self) -> None:
        self.ready.set()
        self._settled.set()

    # --- channels -----------------------------------------------------------------------

    def send_control(self, op: str, **fields: Any) -> None:
        if self.control.readyState == "open":
            self.control.send(protocol.control_message(op, **fields))

    def on_control(self, handler: Callable[[dict[str, Any]], None]) -> None:
        self._control_handlers.append(handler)

    def _on_control_message(self, message: Any) -> None:
        if not isinstance(message, str):
            return
        try:
            parsed = protocol.parse_control_message(message)
        except protocol.ProtocolError as exc:
            log.debug("ignoring control message: %s", exc.message)
            return
        if parsed["op"] == "ending":  # the gateway ends the session (limit, terminate): its reason first
            self.ended_by_gateway = True
            self.mark_lost(str(parsed.get("reason") or "the gateway ended the session")[:300])
            self.send_control("ended")
            return
        if parsed["op"] == "notice":  # a line for the user from the gateway (a limit's warning)
            log.info("gateway: %s", str(parsed.get("message"))[:300])
            return
        for handler in list(self._control_handlers):
            handler(parsed)

    def open_stream(self) -> RTCDataChannel:
        """A new negotiated channel for one tunnel connection (the gateway creates its twin on 'open')."""
        span = protocol.MAX_STREAM_ID - protocol.FIRST_STREAM_ID + 1
        for _ in range(span):
            stream_id = self._next_stream_id
            self._next_stream_id = (protocol.FIRST_STREAM_ID + (stream_id + 1 - protocol.FIRST_STREAM_ID) % span)
            if stream_id in self._streams:
                continue
            try:
                channel = self.pc.createDataChannel(f"tcp-{stream_id}", negotiated=True, id=stream_id)
            except ValueError:  # still being reset from an earlier use
                continue
            self._streams[stream_id] = channel
            channel.on("close", lambda sid=stream_id: self._streams.pop(sid, None))
            return channel
        raise RuntimeError("no free data-channel id: too many open connections")

    async def close(self) -> None:
        self._closing = True
        if self._gathering is not None and not self._gathering.done():
            self._gathering.cancel()
        await self.pc.close()
