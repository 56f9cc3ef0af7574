"""One aiortc answerer per conversation: the peer connection, its channels and its targets.

The order of work is chosen for speed and for aiortc's quirks: negotiated channels exist
before the offer is applied (no channel-open round trip), the SSH connect starts the moment
the offer arrives (it overlaps ICE), and remote candidates that arrive before the offer is
applied are queued, because aiortc silently drops them.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any, Callable

from aiortc import RTCDataChannel, RTCSessionDescription

from .. import rtc
from ..protocol import (CONTROL_CHANNEL_ID, FIRST_STREAM_ID, MAX_STREAM_ID, MAX_TERMINAL_SIZE,
                        TERMINAL_CHANNEL_ID, CandidateBatch, ProtocolError, SessionRequest,
                        candidate_from_wire, control_message, parse_control_message,
                        split_sdp_candidates)
from .config import GatewaySettings, Resource
from .recording import AsciicastRecorder
from .targets import ChannelPipe, SshTerminal, TcpStream

log = logging.getLogger(__name__)

Event = dict[str, Any]
# Each remote candidate costs ICE checks; an honest client has a handful.
MAX_REMOTE_CANDIDATES = 256


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class AnswerSession:
    """The gateway side of one conversation, from offer to close."""

    def __init__(self, conversation_id: str, user: str, resource: Resource, request: SessionRequest,
                 settings: GatewaySettings, emit: Callable[[Event], None],
                 on_end: Callable[[AnswerSession], None]) -> None:
        self.conversation_id, self.user, self.resource, self.request = conversation_id, user, resource, request
        self.settings = settings
        self._emit, self._on_end = emit, on_end
        # Every remote candidate handed to aiortc, in order: {"candidate": "candidate:...", "via": ...}
        # where via is "sdp", "batch" or "single". Tests and diagnostics read it.
        self.remote_candidates: list[dict[str, str]] = []
        self._queued: list[tuple[dict[str, Any], str]] = []  # (wire candidate, via)
        self._queued_end = False
        self._offer_applied = False
        self._remote_end = False
        self._closing = False
        self._tasks: set[asyncio.Future[Any]] = set()
        self._ice_timer: asyncio.TimerHandle | None = None
        self.streams: dict[int, TcpStream] = {}
        self.ssh: SshTerminal | None = None
        recorder = self._recorder()  # first: a session that must be recorded never runs unrecorded
        self.pc = rtc.new_peer_connection(rtc.ice_servers_from_config(settings.ice_servers),
                                          settings.ice_transport_policy)
        self.pc.on("connectionstatechange", self._on_connection_state)
        self._control = self.pc.createDataChannel("control", negotiated=True, id=CONTROL_CHANNEL_ID)
        self._control.on("message", self._on_control)
        if request.mode == "terminal":
            self._start_terminal(recorder)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _recorder(self) -> AsciicastRecorder | None:
        if not (self.resource.record and self.request.mode == "terminal"):
            return None
        try:
            return AsciicastRecorder.create(self.settings.recordings_dir, self.resource.name, self.conversation_id,
                                            self.request.cols, self.request.rows, self.request.term)
        except OSError as exc:
            log.error("cannot write the recording for %s in %s: %s", self.resource.name,
                      self.settings.recordings_dir, exc.strerror)
            raise ProtocolError(503, f"the session on {self.resource.name} must be recorded and the "
                                     "recording cannot be written", "unavailable") from None

    def _start_terminal(self, recorder: AsciicastRecorder | None) -> None:
        """Channel 1 and the SSH connect, both before the offer is applied."""
        channel = self.pc.createDataChannel("terminal", negotiated=True, id=TERMINAL_CHANNEL_ID)
        self.ssh = SshTerminal(self.resource, self.request, recorder, self.settings.redact)
        self.ssh.start()
        self._spawn(self.ssh.run(ChannelPipe(channel)))

    # --- signaling -------------------------------------------------------------------------

    async def apply_offer(self, sdp: str) -> None:
        """setRemoteDescription, then every candidate queued so far (SDP ones first)."""
        bare, sdp_candidates, end = split_sdp_candidates(sdp)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=bare, type="offer"))
        self._queued[:0] = [(c, "sdp") for c in sdp_candidates]
        self._queued_end = self._queued_end or end
        # Candidates may keep arriving while these are applied; drain until none is left,
        # then flip to direct application with no await in between.
        while self._queued:
            batch, self._queued = self._queued, []
            for candidate, via in batch:
                await self._apply(candidate, via)
        self._offer_applied = True
        if self._queued_end:
            await self._end_candidates()
        self._ice_timer = asyncio.get_running_loop().call_later(self.settings.ice_timeout, self._ice_timed_out)

    async def create_answer(self) -> str:
        """The answer SDP with the host candidates inside; server-reflexive and relay candidates
        follow as 'candidates' events when found, so a slow STUN/TURN server never delays it."""
        answer = await self.pc.createAnswer()
        await rtc.set_local_description(self.pc, answer, self.settings.host_addresses)
        sdp = rtc.local_description_sdp(self.pc)
        if rtc.gathering_late(self.pc):
            rtc.watch_late_candidates(self.pc, self._trickle_local)
        return sdp

    def _trickle_local(self, candidate: dict[str, Any] | None) -> None:
        if not self._closing:
            self._emit({"type": "candidates", "candidates": [] if candidate is None else [candidate],
                        "end_of_candidates": candidate is None})

    async def add_candidates(self, batch: CandidateBatch, via: str) -> int:
        """Apply (or queue, before the offer) a batch or single candidate; returns how many were taken."""
        candidates = batch.candidates
        if len(self.remote_candidates) + len(self._queued) + len(candidates) > MAX_REMOTE_CANDIDATES:
            raise ProtocolError(400, f"more than {MAX_REMOTE_CANDIDATES} candidates for one conversation")
        if not self._offer_applied:
            self._queued.extend((c, via) for c in candidates)
            self._queued_end = self._queued_end or batch.end_of_candidates
            return len(candidates)
        for candidate in candidates:
            await self._apply(candidate, via)
        if batch.end_of_candidates:
            await self._end_candidates()
        return len(candidates)

    async def _apply(self, wire: dict[str, Any], via: str) -> None:
        if self._remote_end or self._closing:
            return
        candidate = candidate_from_wire(wire)
        if not _is_ip_literal(candidate.ip):
            # mDNS names would make aioice send multicast queries; only literal addresses are used.
            log.debug("conversation %s: skipping candidate with a host name", self.conversation_id)
            return
        if candidate.sdpMid is None and candidate.sdpMLineIndex is None:
            candidate.sdpMLineIndex = 0
        await self.pc.addIceCandidate(candidate)
        self.remote_candidates.append({"candidate": wire["candidate"], "via": via})

    async def _end_candidates(self) -> None:
        if not self._remote_end and not self._closing:
            self._remote_end = True
            await self.pc.addIceCandidate(None)

    # --- lifecycle -------------------------------------------------------------------------

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected":
            self._cancel_ice_timer()
            self._emit({"type": "state", "state": "connected", "reason": ""})
        elif state in ("failed", "closed") and not self._closing:
            self._spawn(self.close("peer connection lost", "failed" if state == "failed" else "closed"))

    def _ice_timed_out(self) -> None:
        if self.pc.connectionState != "connected":
            self._spawn(self.close(f"ICE did not connect within {self.settings.ice_timeout:g} s", "failed"))

    def _cancel_ice_timer(self) -> None:
        if self._ice_timer is not None:
            self._ice_timer.cancel()
            self._ice_timer = None

    async def close(self, reason: str, state: str = "closed") -> None:
        """Free the peer and every target; tell the client why (once)."""
        if self._closing:
            return
        self._closing = True
        self._cancel_ice_timer()
        if self.ssh is not None:
            self.ssh.close()
        current = asyncio.current_task()
        pending = [t for t in self._tasks if t is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self.pc.close()
        self._emit({"type": "state", "state": state, "reason": reason})
        self._on_end(self)
        log.info("conversation %s (%s, %s) %s: %s", self.conversation_id, self.user, self.resource.name,
                 state, reason)

    # --- data plane: control channel -------------------------------------------------------

    def _send_control(self, op: str, **fields: Any) -> None:
        if self._control.readyState == "open":
            self._control.send(control_message(op, **fields))

    def _on_control(self, message: Any) -> None:
        if not isinstance(message, str):
            return
        try:
            msg = parse_control_message(message)
        except ProtocolError as exc:
            log.debug("conversation %s: bad control message: %s", self.conversation_id, exc.message)
            return
        op = msg["op"]
        if op == "ping":
            self._send_control("pong")
        elif op == "open" and self.request.mode == "tunnel":
            self._spawn(self._open_stream(msg.get("id")))
        elif op == "resize" and self.ssh is not None:
            cols, rows = msg.get("cols"), msg.get("rows")
            if all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_TERMINAL_SIZE
                   for v in (cols, rows)):
                self.ssh.resize(cols, rows)
        elif op != "pong":
            log.debug("conversation %s: ignoring control op %r", self.conversation_id, op[:32])

    async def _open_stream(self, stream_id: Any) -> None:
        """open N: channel N to a fresh TCP connection; opened or refused, never both."""
        if not isinstance(stream_id, int) or isinstance(stream_id, bool) \
                or not FIRST_STREAM_ID <= stream_id <= MAX_STREAM_ID:
            self._send_control("refused", id=stream_id if isinstance(stream_id, int) else None,
                               reason=f"stream id must be an integer from {FIRST_STREAM_ID} to {MAX_STREAM_ID}")
            return
        if stream_id in self.streams:
            self._send_control("refused", id=stream_id, reason=f"stream {stream_id} is already open")
            return
        try:
            channel: RTCDataChannel = self.pc.createDataChannel(f"stream-{stream_id}", negotiated=True,
                                                                id=stream_id)
        except ValueError:
            self._send_control("refused", id=stream_id, reason=f"stream {stream_id} is still closing")
            return
        stream = TcpStream(ChannelPipe(channel), self.resource.host, self.resource.port)
        self.streams[stream_id] = stream
        try:
            try:
                await stream.connect()
            except (OSError, asyncio.TimeoutError) as exc:
                reason = (f"{self.resource.name} refused the connection" if isinstance(exc, ConnectionRefusedError)
                          else f"cannot connect to {self.resource.name} ({exc.__class__.__name__})")
                self._send_control("refused", id=stream_id, reason=reason)
                stream.pipe.close()
                return
            self._send_control("opened", id=stream_id)
            await stream.run()
        finally:
            self.streams.pop(stream_id, None)
