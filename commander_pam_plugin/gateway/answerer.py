"""One aiortc answerer per conversation: the peer connection, its channels and its targets.

The order of work is chosen for speed and for aiortc's quirks: negotiated channels exist
before the offer is applied (no channel-open round trip), the SSH connect starts the moment
the offer arrives (it overlaps ICE), and remote candidates that arrive before the offer is
applied are queued, because aiortc silently drops them.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from aiortc import RTCDataChannel, RTCSessionDescription

from .. import rtc
from ..protocol import (CONTROL_CHANNEL_ID, FIRST_STREAM_ID, MAX_STREAM_ID, MAX_TERMINAL_SIZE,
                        TERMINAL_CHANNEL_ID, CandidateBatch, ProtocolError, SessionRequest,
                        candidate_from_wire, control_message, parse_control_message,
                        split_sdp_candidates)
from ..flow import BufferBudget, parse_window
from .candidate_policy import CandidatePolicy
from .config import GatewaySettings, Resource
from .limits import ConnectionQuota, GatewayLimits, RateBucket
from .recording import AsciicastRecorder
from .launch_sessions import ATTACHED_ELSEWHERE, LaunchSession, LaunchSessions
from .targets import ChannelClosed, ChannelPipe, SshTerminal, TcpStream

log = logging.getLogger(__name__)

Event = dict[str, Any]
# What one conversation may send (queued or applied) before the router refuses with 400; how
# many of them ICE checks is limits.max_remote_candidates.
MAX_REMOTE_CANDIDATES = 256
REFUSAL_NOTICE_S = 1.0  # at most one "over the rate" notice per session this often
ENDING_ACK_S = 2.0  # end(): how long the client may take to acknowledge the reason before the close
PEER_LOST = "peer connection lost"
RESUME_HELLO_TIMEOUT_S = 10.0  # a resumed terminal channel must name its session this soon


class AnswerSession:
    """The gateway side of one conversation, from offer to close."""

    def __init__(self, conversation_id: str, user: str, resource: Resource, request: SessionRequest,
                 settings: GatewaySettings, emit: Callable[[Event], None],
                 on_end: Callable[[AnswerSession], None], *, limits: GatewayLimits | None = None,
                 connections: ConnectionQuota | None = None, router_url: str | None = None,
                 client_window: int | None = None, launch_sessions: LaunchSessions | None = None) -> None:
        self.conversation_id, self.user, self.resource, self.request = conversation_id, user, resource, request
        self.settings = settings
        self.limits = limits or settings.limits.resolved()
        self.connections = connections or ConnectionQuota(self.limits)
        self.budget = BufferBudget(self.limits.session_buffer_bytes)
        self.candidate_policy = CandidatePolicy.for_gateway(settings, self.limits.allow_loopback_candidates,
                                                            router_url)
        self.dropped_candidates: list[dict[str, str]] = []  # (candidate, reason): diagnostics and tests
        self._control_rate = RateBucket(self.limits.control_messages_per_s, 2 * self.limits.control_messages_per_s,
                                        asyncio.get_event_loop().time())
        self._last_notice = float("-inf")
        self._pending_size: tuple[int, int] | None = None
        self._resize_timer: asyncio.TimerHandle | None = None
        self._last_resize = float("-inf")
        self.resizes_applied = 0
        self._client_window = client_window  # terminal: the credit the client's offer announced
        self._emit, self._on_end = emit, on_end
        # Every remote candidate handed to aiortc, in order: {"candidate": "candidate:...", "via": ...}
        # where via is "sdp", "batch" or "single". Tests and diagnostics read it.
        self.remote_candidates: list[dict[str, str]] = []
        self._queued: list[tuple[dict[str, Any], str]] = []  # (wire candidate, via)
        self._queued_end = False
        self._offer_applied = False
        self._remote_end = False
        self._closing = False
        self.end_reason, self.end_state = "", ""  # set by close(), read by on_end (the audit's end line)
        self._ending_ack = asyncio.Event()  # the client read end()'s reason (control 'ended')
        # governance: a stream to another resource of this gateway (peer reuse) asks this first;
        # a string is the refusal the client reads
        self.stream_policy: Callable[[Resource], str | None] | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._ice_timer: asyncio.TimerHandle | None = None
        self.streams: dict[int, TcpStream] = {}
        self.ssh: SshTerminal | None = None
        self.launch_sessions = launch_sessions if launch_sessions is not None else LaunchSessions()
        self.launch: LaunchSession | None = None  # a launch that may outlive this conversation (resume)
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
        if not (self.resource.record and self.request.mode == "terminal") or self.request.resume:
            return None  # a resumed session goes on in the recording it began
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
        pipe = self._pipe(channel, self._client_window, announce=True)
        if self.request.resume:
            self._spawn(self._resume_terminal(pipe, self.request.resume))
            return
        self.ssh = SshTerminal(self.resource, self.request, recorder, self.settings.redact)
        self.ssh.start()
        if self.request.resumable or self.request.stderr:  # a current client: numbered, resumable output
            self.launch = self.launch_sessions.open(self.conversation_id, self.user, self.resource, self.ssh,
                                                    self.request.resumable)
            self._spawn(self.launch.attach(pipe, self.conversation_id, 0))
        else:
            self._spawn(self.ssh.run(pipe))

    async def _resume_terminal(self, pipe: ChannelPipe, session_id: str) -> None:
        """A resume: the secret comes first on the new terminal channel (DTLS, never the router)."""
        try:
            await pipe.wait_open()
            hello = await asyncio.wait_for(pipe.receive(), RESUME_HELLO_TIMEOUT_S)
        except (ChannelClosed, asyncio.TimeoutError):
            pipe.fail("no resume request on the terminal channel")
            return
        if not isinstance(hello, dict) or hello.get("op") != "resume" or hello.get("id") != session_id:
            pipe.fail("the first message of a resumed terminal must be its resume request")
            return
        launch, refusal = self.launch_sessions.claim(session_id, self.user, hello.get("secret"),
                                                     hello.get("output"))
        if launch is None:
            log.warning("conversation %s (%s, %s): resume of %s refused: %s", self.conversation_id, self.user,
                        self.resource.name, session_id, refusal)
            # A client whose old peer the gateway still thinks live tries again (retry); other refusals are final.
            pipe.control("error", reason=f"resume refused: {refusal}", retry=refusal == ATTACHED_ELSEWHERE)
            pipe.close()
            return
        self.launch, self.ssh = launch, launch.ssh
        await launch.attach(pipe, self.conversation_id, hello["output"], resumed=True)

    def _pipe(self, channel: RTCDataChannel, send_limit: int | None, announce: bool = False) -> ChannelPipe:
        """A stream with this gateway's window, bounds and the session's buffer budget."""
        return ChannelPipe(channel, send_limit=send_limit, window=self.limits.stream_window,
                           bound=self.limits.stream_buffer_bytes, budget=self.budget, announce=announce)

    # --- signaling -------------------------------------------------------------------------

    async def apply_offer(self, sdp: str) -> None:
        """setRemoteDescription, then every candidate queued so far (SDP ones first)."""
        bare, sdp_candidates, end = split_sdp_candidates(sdp)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=bare, type="offer"))
        early, self._queued = self._queued, []
        queued_end, self._queued_end = self._queued_end, False
        admitted = [(c, "sdp") for c in sdp_candidates if self._admit(c, len(self._queued))]
        self._queued = admitted + early
        self._queued_end = queued_end or end
        # Candidates may keep arriving while these are applied; drain until none is left,
        # then flip to direct application with no await in between.
        while self._queued:
            batch, self._queued = self._queued, []
            for candidate, via in batch:
                await self._apply(candidate, via, admitted=True)
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
        """Apply (or queue, before the offer) a batch or single candidate; returns how many will be
        checked (dropped ones, by policy or after end-of-candidates, are not counted)."""
        candidates = batch.candidates
        if len(self.remote_candidates) + len(self._queued) + len(candidates) > MAX_REMOTE_CANDIDATES:
            raise ProtocolError(400, f"more than {MAX_REMOTE_CANDIDATES} candidates for one conversation")
        taken = 0
        if not self._offer_applied:
            for candidate in candidates:
                if self._admit(candidate, len(self._queued)):
                    self._queued.append((candidate, via))
                    taken += 1
            self._queued_end = self._queued_end or batch.end_of_candidates
            return taken
        for candidate in candidates:
            taken += await self._apply(candidate, via)
        if batch.end_of_candidates:
            await self._end_candidates()
        return taken

    def _admit(self, wire: dict[str, Any], waiting: int = 0) -> bool:
        """Policy, end-of-candidates and the per-conversation cap; a dropped candidate is recorded."""
        reason = None
        if self._remote_end or self._queued_end:
            reason = "after end-of-candidates"
        elif len(self.remote_candidates) + waiting >= self.limits.max_remote_candidates:
            reason = f"over {self.limits.max_remote_candidates} candidates for one conversation"
        else:
            candidate = candidate_from_wire(wire)
            reason = self.candidate_policy.refusal(candidate.ip, candidate.port)
        if reason is not None:
            self.dropped_candidates.append({"candidate": wire["candidate"], "reason": reason})
            log.debug("conversation %s: candidate dropped: %s", self.conversation_id, reason)
            return False
        return True

    async def _apply(self, wire: dict[str, Any], via: str, admitted: bool = False) -> int:
        """1 if the candidate was handed to ICE, else 0."""
        if self._closing or not (admitted or self._admit(wire)):
            return 0
        candidate = candidate_from_wire(wire)
        if candidate.sdpMid is None and candidate.sdpMLineIndex is None:
            candidate.sdpMLineIndex = 0
        await self.pc.addIceCandidate(candidate)
        self.remote_candidates.append({"candidate": wire["candidate"], "via": via})
        return 1

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
            self._spawn(self.close(PEER_LOST, "failed" if state == "failed" else "closed"))

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
        if self._resize_timer is not None:
            self._resize_timer.cancel()
        if self.launch is not None:  # a lost peer leaves it held; any other close ends it
            self.launch.released(self.conversation_id, reason, peer_lost=reason == PEER_LOST)
        elif self.ssh is not None:
            self.ssh.close()
        current = asyncio.current_task()
        pending = [t for t in self._tasks if t is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self.pc.close()
        self._emit({"type": "state", "state": state, "reason": reason})
        self.end_reason, self.end_state = reason, state
        self._on_end(self)
        log.info("conversation %s (%s, %s) %s: %s", self.conversation_id, self.user, self.resource.name,
                 state, reason)

    async def end(self, reason: str) -> None:
        """End on the gateway's initiative (a limit, `terminate`): the client reads `reason` on the
        control channel first (control 'ending', acknowledged with 'ended', at most ENDING_ACK_S),
        so it is never overtaken by the close itself; then close as usual."""
        if self._closing:
            return
        if self._control.readyState == "open":
            self._send_control("ending", reason=reason)
            try:
                await asyncio.wait_for(self._ending_ack.wait(), ENDING_ACK_S)
            except asyncio.TimeoutError:
                log.debug("conversation %s: no 'ended' from the client", self.conversation_id)
        await self.close(reason)

    def notice(self, message: str) -> None:
        """A line for the user (a limit's warning); the session goes on."""
        self._send_control("notice", message=message)

    # --- data plane: control channel -------------------------------------------------------

    def _send_control(self, op: str, **fields: Any) -> None:
        if self._control.readyState == "open":
            self._control.send(control_message(op, **fields))

    def _refuse(self, reason: str, **fields: Any) -> None:
        """A `refused` to this session's client only; the session goes on."""
        self._send_control("refused", reason=reason, **fields)

    def _on_control(self, message: Any) -> None:
        """Every control message is answered or refused with a reason; none ends the session."""
        try:
            self._handle_control(message)
        except Exception:  # a bug here must cost one message, never the session
            log.warning("conversation %s: control message failed", self.conversation_id, exc_info=True)
            self._refuse("the gateway could not handle that control message")

    def _handle_control(self, message: Any) -> None:
        if not isinstance(message, str):
            self._refuse("control messages are JSON text")
            return
        try:
            msg = parse_control_message(message)
        except (ProtocolError, ValueError, RecursionError) as exc:
            reason = exc.message if isinstance(exc, ProtocolError) else "control message is not valid JSON"
            self._refuse(reason)
            return
        op = msg["op"]
        if op == "ended":  # the client read end()'s reason
            self._ending_ack.set()
            return
        if op == "resize" and self.ssh is not None:
            self._resize(msg.get("cols"), msg.get("rows"))  # coalesced, so never rate-refused
            return
        now = asyncio.get_running_loop().time()
        if not self._control_rate.take(now):
            if op == "open" and _is_stream_id(msg.get("id")):  # the client waits for this id's answer
                self._refuse(f"over {self.limits.control_messages_per_s:g} control messages per second",
                             id=msg["id"])
            elif now - self._last_notice >= REFUSAL_NOTICE_S:
                self._last_notice = now
                self._refuse(f"over {self.limits.control_messages_per_s:g} control messages per second; "
                             "some were dropped")
            return
        if op == "ping":
            self._send_control("pong")
        elif op == "open" and self.request.mode == "tunnel":
            target = self._stream_target(msg)
            if target is not None:
                self._spawn(self._open_stream(msg.get("id"), parse_window(msg.get("window")), target))
        elif op == "pong":
            pass
        else:
            self._refuse(f"unknown control op {op[:32]!r} for a {self.request.mode} session",
                         **({"id": msg["id"]} if _is_stream_id(msg.get("id")) else {}))

    def _resize(self, cols: Any, rows: Any) -> None:
        """Keep the newest size; apply it at most resizes_per_s times a second (the last one always)."""
        if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_TERMINAL_SIZE
                   for v in (cols, rows)):
            now = asyncio.get_running_loop().time()
            if now - self._last_notice >= REFUSAL_NOTICE_S:
                self._last_notice = now
                self._refuse(f"resize needs cols and rows, integers from 1 to {MAX_TERMINAL_SIZE}")
            return
        self._pending_size = (cols, rows)
        if self._resize_timer is not None:
            return
        loop = asyncio.get_running_loop()
        due = self._last_resize + 1.0 / self.limits.resizes_per_s
        if due <= loop.time():
            self._apply_resize()  # at once: a ping after a lone resize still finds it applied
        else:
            self._resize_timer = loop.call_at(due, self._apply_resize)

    def _apply_resize(self) -> None:
        self._resize_timer = None
        size, self._pending_size = self._pending_size, None
        if size is None or self.ssh is None or self._closing:
            return
        self._last_resize = asyncio.get_running_loop().time()
        self.resizes_applied += 1
        self.ssh.resize(*size)

    def _stream_target(self, msg: dict[str, Any]) -> Resource | None:
        """The resource an `open` names (peer reuse: a client's second tunnel on this peer), checked
        with the offer's own rules: it exists here and this user may use it. None: refused."""
        name = msg.get("resource")
        if name is None or name == self.resource.name:
            return self.resource
        stream_id = msg.get("id") if _is_stream_id(msg.get("id")) else None
        target = self.settings.resource(name) if isinstance(name, str) else None
        if target is None:
            self._refuse(f"this gateway has no resource named {str(name)[:64]}", id=stream_id)
            return None
        if not target.allows(self.user):
            log.warning("conversation %s (%s): stream to %s refused: not allowed", self.conversation_id,
                        self.user, target.name)
            self._refuse(f"user {self.user} may not use resource {target.name}", id=stream_id)
            return None
        refusal = self.stream_policy(target) if self.stream_policy is not None else None
        if refusal is not None:
            self._refuse(refusal, id=stream_id)
            return None
        return target

    async def _open_stream(self, stream_id: Any, client_window: int | None = None,
                           target: Resource | None = None) -> None:
        """open N: channel N to a fresh TCP connection to `target` (default: the offer's resource);
        opened or refused, never both."""
        target = target or self.resource
        if not _is_stream_id(stream_id):
            self._refuse(f"stream id must be an integer from {FIRST_STREAM_ID} to {MAX_STREAM_ID}",
                         id=stream_id if type(stream_id) is int and abs(stream_id) < 2 ** 31 else None)
            return
        if stream_id in self.streams:
            self._refuse(f"stream {stream_id} is already open", id=stream_id)
            return
        if len(self.streams) >= self.limits.streams_per_session:
            self._refuse(f"this session has {self.limits.streams_per_session} open streams, its limit",
                         id=stream_id)
            return
        quota = self.connections.acquire(self.user)
        if quota is not None:
            log.warning("conversation %s (%s): stream refused: %s", self.conversation_id, self.user, quota)
            self._refuse(quota, id=stream_id)
            return
        try:
            try:
                channel: RTCDataChannel = self.pc.createDataChannel(f"stream-{stream_id}", negotiated=True,
                                                                    id=stream_id)
            except ValueError:
                self._refuse(f"stream {stream_id} is still closing", id=stream_id)
                return
            stream = TcpStream(self._pipe(channel, client_window), target.host, target.port)
            self.streams[stream_id] = stream
            try:
                await stream.connect()
            except (OSError, asyncio.TimeoutError) as exc:
                reason = (f"{target.name} refused the connection" if isinstance(exc, ConnectionRefusedError)
                          else f"cannot connect to {target.name} ({exc.__class__.__name__})")
                self._refuse(reason, id=stream_id)
                stream.pipe.close()
                return
            self._send_control("opened", id=stream_id, window=self.limits.stream_window)
            await stream.run()
        finally:
            self.streams.pop(stream_id, None)
            self.connections.release(self.user)


def _is_stream_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and FIRST_STREAM_ID <= value <= MAX_STREAM_ID
