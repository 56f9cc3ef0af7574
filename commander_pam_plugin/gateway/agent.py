"""The gateway agent: dials the router, answers actions, runs one answerer per conversation.

The gateway dials out (it may sit behind NAT) and keeps dialling, with exponential backoff
and jitter, whenever the router goes away; live sessions do not depend on the router link.
Actions are handled concurrently, so one slow offer never holds up another conversation.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import aiohttp

from ..protocol import (ALL_CAPABILITIES, CAP_BATCH, CAP_TRICKLE, GATEWAY_VERSION, MAX_WS_MESSAGE_BYTES,
                        Action, CandidateBatch, ProtocolError, parse_json, validate_action,
                        validate_icecandidate_data, validate_offer_data)
from .answerer import MAX_REMOTE_CANDIDATES, AnswerSession
from ..flow import parse_window
from ..protocol import candidate_from_wire
from .candidate_policy import CandidatePolicy
from .config import GatewaySettings, Resource
from .governance import Governor, approval_wait_text
from .hookspecs import Decision
from .launch_sessions import LaunchSessions
from .limits import ConnectionQuota, descriptor_limit

log = logging.getLogger(__name__)

LEGACY_VERSION = "1.6.0"
HEARTBEAT_S = 10.0
WELCOME_TIMEOUT_S = 10.0
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 10.0
MAX_SESSIONS = 256
OUTBOX_LIMIT = 1024
# Candidates for a conversation whose offer has not arrived yet (a client may race them).
EARLY_CONVERSATIONS = 64
EARLY_TTL_S = 60.0
CANDIDATE_HISTORY = 256


def backoff_delays(rng: random.Random | None = None) -> Iterator[float]:
    """Waits between redials: doubling from BACKOFF_MIN_S to BACKOFF_MAX_S, each drawn from
    [d/2, d] so gateways that lost the same router do not all redial at the same instant."""
    rng = rng or random.Random()
    delay = BACKOFF_MIN_S
    while True:
        yield delay * rng.uniform(0.5, 1.0)
        delay = min(delay * 2, BACKOFF_MAX_S)


class RouterRefused(Exception):
    """The router closed the link instead of welcoming us (bad name or token)."""


@dataclass
class _EarlyCandidates:
    user: str
    items: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    end: bool = False
    created: float = field(default_factory=time.monotonic)


class GatewayAgent:
    """Connects to the router and serves actions until stop()."""

    def __init__(self, settings: GatewaySettings, router_url: str | Sequence[str] | None = None) -> None:
        # Several router nodes: the agent dials the next one whenever its node goes away.
        urls = [router_url] if isinstance(router_url, str) else list(router_url or settings.router_urls)
        if not urls:
            raise ValueError("the gateway needs a router URL (gateway.router_url or --router)")
        self.settings = settings
        self.router_urls = [u.rstrip("/") for u in urls]
        self.router_url = self.router_urls[0]
        self.name = settings.name
        self.version = LEGACY_VERSION if settings.legacy else GATEWAY_VERSION
        default_caps: tuple[str, ...] = () if settings.legacy else ALL_CAPABILITIES
        self.capabilities = list(settings.capabilities if settings.capabilities is not None else default_caps)
        self.sessions: dict[str, AnswerSession] = {}
        self.governor = Governor(settings)  # policy hooks, approvals, limits, audit (governance.py)
        self._control: Any = None  # control.ControlServer while run() serves one
        # pam launch sessions, held across a client's outage; each change is an audit line
        self.launch_sessions = LaunchSessions(on_event=self._launch_event)
        self.descriptor_limit = descriptor_limit()
        self.limits = settings.limits.resolved(self.descriptor_limit)
        self.connections = ConnectionQuota(self.limits)  # shared by every session of this gateway
        self.candidate_policy = CandidatePolicy.for_gateway(settings, self.limits.allow_loopback_candidates,
                                                            self.router_url)
        # Remote candidates applied per conversation (kept after a session ends, for tests).
        self.applied_candidates: OrderedDict[str, list[dict[str, str]]] = OrderedDict()
        # Set while the router has welcomed us / while we have no link (tests wait on both).
        self.online = asyncio.Event()
        self.offline = asyncio.Event()
        self.offline.set()
        self._early: OrderedDict[str, _EarlyCandidates] = OrderedDict()
        # (link generation for a reply, None for an event, frame text)
        self._outbox: asyncio.Queue[tuple[int | None, str]] = asyncio.Queue(OUTBOX_LIMIT)
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        # Bumped whenever the router link drops: a reply belongs to the link its action came
        # on. Sent on a later link it could match another user's request id on a restarted router.
        self._link_generation = 0

    # --- router link -----------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected until stop(): reconnect with exponential backoff and jitter."""
        delays = backoff_delays()
        async with aiohttp.ClientSession() as http:
            while not self._stopping.is_set():
                try:
                    if await self._serve_link(http):
                        delays = backoff_delays()
                except RouterRefused as exc:
                    log.error("router %s refused gateway %s: %s", self.router_url, self.name, exc)
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                    log.warning("router %s unreachable (%s)", self.router_url, exc.__class__.__name__)
                if self._stopping.is_set():
                    break
                nodes = self.router_urls  # lost or never reached: the next node (backoff still applies)
                self.router_url = nodes[(nodes.index(self.router_url) + 1) % len(nodes)]
                try:
                    await asyncio.wait_for(self._stopping.wait(), next(delays))
                except asyncio.TimeoutError:
                    pass

    async def start_control(self) -> None:
        """The local control socket (gateway.control_socket), if configured: before run(), so a
        socket that cannot be served fails the start (OSError) instead of a background task."""
        path = self.settings.governance.control_socket
        if path is not None and self._control is None:
            from .control import ControlServer

            control = ControlServer(path, self.governor)
            await control.start()
            self._control = control

    async def _serve_link(self, http: aiohttp.ClientSession) -> bool:
        """One connection: hello, welcome, then actions until it drops. True if welcomed."""
        headers = {"Authorization": f"Bearer {self.settings.token}"}
        ssl_context: Any = None
        if self.router_url.startswith("https://"):  # wss: verify the router (router_ca_file, else system CAs)
            from .tls import client_context

            ssl_context = client_context(self.settings.router_ca_file)
        async with http.ws_connect(f"{self.router_url}/api/v1/gateway/connect", headers=headers,
                                   heartbeat=HEARTBEAT_S, max_msg_size=MAX_WS_MESSAGE_BYTES,
                                   ssl=ssl_context if ssl_context is not None else True) as ws:
            await ws.send_json(self.hello())
            message = await asyncio.wait_for(ws.receive(), WELCOME_TIMEOUT_S)
            if message.type != aiohttp.WSMsgType.TEXT or _message_type(message.data) != "welcome":
                raise RouterRefused(f"close code {ws.close_code}")
            self._ws = ws
            self.offline.clear()
            self.online.set()
            log.info("gateway %s online at %s (version %s)", self.name, self.router_url, self.version)
            log.info("gateway %s: descriptor limit %d: at most %d target connections, %d per user, "
                     "%d streams per session", self.name, self.descriptor_limit, self.limits.connections_per_gateway,
                     self.limits.connections_per_user, self.limits.streams_per_session)
            writer = asyncio.ensure_future(self._write(ws))
            try:
                async for message in ws:
                    if message.type == aiohttp.WSMsgType.TEXT:
                        self._dispatch(message.data)
            finally:
                self._link_generation += 1
                self.online.clear()
                self.offline.set()
                self._ws = None
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            if not self._stopping.is_set():
                log.warning("gateway %s lost the router link (code %s); reconnecting", self.name, ws.close_code)
            return True

    def hello(self) -> dict[str, Any]:
        """The link's first frame. It announces each resource's name, kind and allow list (never its
        host or credentials), so the router can route an offer by resource and list resources
        without asking us; a legacy-mode gateway announces them too (routers ignore what they do not know)."""
        resources = [{"name": r.name, "kind": r.kind, "users": None if r.users is None else list(r.users)}
                     for r in self.settings.resources]
        return {"type": "hello", "gateway": self.name, "version": self.version,
                "capabilities": self.capabilities, "resources": resources,
                # The sessions this run still has: the router frees its other conversations with us.
                "conversations": list(self.sessions)}

    async def _write(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """The only writer on the link, so replies and events keep their order."""
        while True:
            generation, text = await self._outbox.get()
            if generation is None or generation == self._link_generation:
                await ws.send_str(text)
            else:
                log.debug("gateway %s: dropping a reply whose router link is gone", self.name)

    def _send(self, message: dict[str, Any], generation: int | None = None) -> None:
        """Queue a frame; a reply carries the link generation its action came on."""
        try:
            self._outbox.put_nowait((generation, json.dumps(message, separators=(",", ":"))))
        except asyncio.QueueFull:
            log.warning("gateway %s: router link backlog full; dropping a %s", self.name, message.get("type"))

    def emit(self, conversation_id: str, event: dict[str, Any]) -> None:
        """Send a conversation event; the router relays it to the owner's stream."""
        self._send({"type": "event", "conversation_id": conversation_id, "event": event})

    async def stop(self) -> None:
        """Close every session and the router link."""
        self._stopping.set()
        await asyncio.gather(*(s.close("gateway shutting down") for s in list(self.sessions.values())),
                             return_exceptions=True)
        if self._control is not None:
            await self._control.close()
        self.launch_sessions.end_all("gateway shutting down")  # the held ones too
        if self._ws is not None:
            await self._ws.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- actions ---------------------------------------------------------------------------

    def _dispatch(self, text: str) -> None:
        try:
            message = parse_json(text, "frame")
        except ProtocolError as exc:
            log.warning("gateway %s: router sent a bad frame: %s", self.name, exc.message)
            return
        if not isinstance(message, dict) or message.get("type") != "action":
            return
        task = asyncio.ensure_future(self._handle(message, self._link_generation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, message: dict[str, Any], generation: int) -> None:
        request_id = message.get("id")
        user = message.get("user")
        followup = None
        try:
            if not isinstance(request_id, int) or not isinstance(user, str) or not user:
                raise ProtocolError(400, "action needs an integer id and a user")
            action = validate_action({k: message.get(k) for k in ("conversation_id", "kind", "data", "trickle_ice")})
            data, followup = await self._perform(action, user)
            reply = {"type": "reply", "id": request_id, "ok": True, "data": data}
        except ProtocolError as exc:
            reply = {"type": "reply", "id": request_id, "ok": False, "status": exc.status,
                     "error": self.settings.redact(exc.message)}
        except Exception:
            log.exception("gateway %s: %s action failed", self.name, message.get("kind"))
            reply = {"type": "reply", "id": request_id, "ok": False, "status": 500,
                     "error": "the gateway failed to handle this action; see its log"}
        self._send(reply, generation)
        if followup is not None:
            await followup

    async def _perform(self, action: Action, user: str) -> tuple[dict[str, Any], Any]:
        """The reply data, and work to do once the reply is sent (trickle answers)."""
        if action.kind == "ping":
            return {"pong": True}, None
        if action.kind == "resources":
            return {"resources": [r.public(self.name) for r in self.settings.resources if r.allows(user)]}, None
        if action.kind == "offer":
            return await self._offer(action, user)
        if action.kind == "approve":  # an approver, authenticated by the router with their own token
            return self.governor.answer(user, action.data), None
        session = self.sessions.get(action.conversation_id)
        if session is not None and session.user != user:
            raise ProtocolError(403, f"conversation {action.conversation_id} belongs to another user", "forbidden")
        if action.kind == "icecandidate":
            return {"applied": await self._candidates(action, user, session)}, None
        # close
        self._early.pop(action.conversation_id, None)
        self.governor.withdraw(action.conversation_id)  # a held offer the client gave up on
        if session is not None:
            await session.close("closed by client")
        return {"closed": True}, None

    async def _offer(self, action: Action, user: str) -> tuple[dict[str, Any], Any]:
        offer = validate_offer_data(action.data)
        resource = self.settings.resource(offer.resource)
        if resource is None:
            raise ProtocolError(404, f"gateway {self.name} has no resource named {offer.resource}", "not_found")
        if not resource.allows(user):
            raise ProtocolError(403, f"user {user} may not use resource {resource.name}", "forbidden")
        if offer.session.mode == "terminal" and resource.kind != "ssh":
            # The client may not know the kind before its offer (it addressed the offer by resource).
            raise ProtocolError(400, f"{resource.name} is a {resource.kind} resource; pam launch opens ssh "
                                     f"resources (use: pam tunnel start {resource.name})")
        if offer.session.resume is not None:  # the same user, the same resource, still held (PROTOCOL.md 7)
            refusal = self.launch_sessions.offer_refusal(offer.session.resume, user, resource.name)
            if refusal is not None:
                raise ProtocolError(refusal[0], refusal[1], "not_found" if refusal[0] == 404 else "gone")
        cid = action.conversation_id
        if cid in self.sessions:
            raise ProtocolError(409, f"conversation {cid} already has an offer", "conflict")
        if len(self.sessions) >= MAX_SESSIONS:
            raise ProtocolError(503, f"gateway {self.name} is at its limit of {MAX_SESSIONS} sessions",
                                "unavailable")
        request = self.governor.access_request(user, resource, cid, offer.session.mode, action.data)
        # the decision point: nothing reaches the target before it (a held answer needs trickle)
        decision = self.governor.decide(request, can_hold=action.trickle_ice and CAP_TRICKLE in self.capabilities)
        resuming = self.launch_sessions.get(offer.session.resume) if offer.session.resume is not None else None
        if resuming is not None and decision.verdict == "hold":
            decision = Decision.allow()  # approved when it opened: a resume goes on with that session
        if decision.verdict == "deny":
            raise ProtocolError(403, f"access to {resource.name} denied: {decision.reason}", "forbidden")
        if decision.verdict == "hold":
            if any(p.conversation_id == cid for p in self.governor.approvals.pending.values()):
                raise ProtocolError(409, f"conversation {cid} already has an offer", "conflict")
            pending = self.governor.hold(request, decision)
            log.info("conversation %s (%s, %s) held: request %s waits for %s", cid, user, resource.name,
                     pending.id, ", ".join(pending.approvers))
            return ({"held": True, "request": pending.id, "approvers": list(pending.approvers),
                     "waiting_for": approval_wait_text(pending)},
                    self._after_approval(action, user, offer, resource, request, pending))
        return await self._start_session(action, user, offer, resource, request,
                                         started=resuming.opened_at if resuming is not None else None)

    def _launch_event(self, launch: Any, kind: str, text: str) -> None:
        """A launch session held, resumed, expired or ended while away: its audit line."""
        if kind == "resumed" and launch.attached is not None:
            self.governor.record_resume(launch.attached, detail=text)
        elif kind in ("held", "expired") or (kind == "ended" and launch.attached is None):
            self.governor.record("end" if kind == "ended" else kind, user=launch.user,
                                 resource=launch.resource.name, conversation=launch.last_conversation,
                                 detail=text)

    async def _after_approval(self, action: Action, user: str, offer: Any, resource: Resource,
                              request: Any, pending: Any) -> None:
        """A held offer: once approved, the session starts and its answer goes on the stream;
        denied, expired or withdrawn, the client reads why (a failed state) and nothing starts."""
        cid = action.conversation_id
        approved, why = await self.governor.wait_for_approval(request, pending)
        if not approved:
            self.emit(cid, {"type": "state", "state": "failed", "reason": why})
            return
        try:
            data, followup = await self._start_session(action, user, offer, resource, request)
        except ProtocolError as exc:
            self.emit(cid, {"type": "state", "state": "failed", "reason": self.settings.redact(exc.message)})
            return
        if followup is not None:
            await followup
        elif isinstance(data.get("sdp"), str):
            self.emit(cid, {"type": "answer", "sdp": data["sdp"]})

    async def _start_session(self, action: Action, user: str, offer: Any, resource: Resource,
                             request: Any, started: float | None = None) -> tuple[dict[str, Any], Any]:
        """An allowed (or approved) offer becomes an AnswerSession."""
        cid = action.conversation_id
        if cid in self.sessions:
            raise ProtocolError(409, f"conversation {cid} already has an offer", "conflict")
        target = self.governor.connect_resource(resource, user)  # credentials a plugin supplies now
        session = AnswerSession(cid, user, target, offer.session, self.settings,
                                lambda event: self.emit(cid, event), self._session_ended,
                                limits=self.limits, connections=self.connections, router_url=self.router_url,
                                client_window=_session_window(action.data),
                                launch_sessions=self.launch_sessions)
        self.sessions[cid] = session
        session.stream_policy = lambda other: self._stream_refusal(session, other)
        self.governor.opened(session, request, started=started)
        log.info("conversation %s (%s, %s) opened: %s", cid, user, resource.name, offer.session.mode)
        self.applied_candidates[cid] = session.remote_candidates
        while len(self.applied_candidates) > CANDIDATE_HISTORY:
            self.applied_candidates.popitem(last=False)
        early = self._early.pop(cid, None)
        try:
            if early is not None and early.user == user:
                for wire, via in early.items:
                    await session.add_candidates(CandidateBatch([wire], False), via)
                await session.add_candidates(CandidateBatch([], early.end), "batch")
            await session.apply_offer(offer.sdp)
            if action.trickle_ice and CAP_TRICKLE in self.capabilities:
                if action.data.get("answer_in_reply") is not True:  # a client that reads only the stream
                    return {"accepted": True}, self._answer_later(session)
                # The answer is built from host candidates at once (later ones trickle as events),
                # so it rides in this reply: the client's stream is then off the critical path.
                return {"accepted": True, "type": "answer", "sdp": await session.create_answer()}, None
            return {"type": "answer", "sdp": await session.create_answer()}, None
        except ProtocolError:
            await session.close("offer refused", "failed")
            raise
        except Exception as exc:
            await session.close("offer refused", "failed")
            raise ProtocolError(400, f"the offer could not be applied ({exc.__class__.__name__})") from None

    async def _answer_later(self, session: AnswerSession) -> None:
        """Trickle mode: the answer goes on the conversation stream after the 'accepted' reply."""
        try:
            sdp = await session.create_answer()
        except Exception as exc:
            log.warning("conversation %s: answer failed (%s)", session.conversation_id, exc.__class__.__name__)
            self.emit(session.conversation_id, {"type": "error", "message": "the gateway could not answer"})
            await session.close("answer failed", "failed")
            return
        self.emit(session.conversation_id, {"type": "answer", "sdp": sdp})

    async def _candidates(self, action: Action, user: str, session: AnswerSession | None) -> int:
        batch = validate_icecandidate_data(action.data, batch_allowed=CAP_BATCH in self.capabilities)
        via = "batch" if "candidates" in action.data else "single"
        if session is not None:
            return await session.add_candidates(batch, via)
        return self._hold_early(action.conversation_id, user, batch.candidates, batch.end_of_candidates, via)

    def _hold_early(self, cid: str, user: str, candidates: list[dict[str, Any]], end: bool, via: str) -> int:
        """Keep candidates that beat their offer here (bounded, 60 s), never drop them silently."""
        now = time.monotonic()
        for key in [k for k, v in self._early.items() if now - v.created > EARLY_TTL_S]:
            del self._early[key]
        early = self._early.get(cid)
        if early is None:
            if len(self._early) >= EARLY_CONVERSATIONS:
                self._early.popitem(last=False)
            early = self._early[cid] = _EarlyCandidates(user)
        elif early.user != user:
            raise ProtocolError(403, f"conversation {cid} belongs to another user", "forbidden")
        if len(early.items) + len(candidates) > MAX_REMOTE_CANDIDATES:
            raise ProtocolError(400, f"more than {MAX_REMOTE_CANDIDATES} candidates for one conversation")
        # Counted as applied only if the session will hand them to ICE (same rules as its own).
        taken = [c for c in candidates if not early.end and self._checkable(c)]
        early.items.extend((c, via) for c in taken)
        early.end = early.end or end
        return len(taken)

    def _checkable(self, wire: dict[str, Any]) -> bool:
        candidate = candidate_from_wire(wire)
        return self.candidate_policy.refusal(candidate.ip, candidate.port) is None

    def _session_ended(self, session: AnswerSession) -> None:
        if self.sessions.get(session.conversation_id) is session:
            del self.sessions[session.conversation_id]
        self.governor.ended(session, session.end_reason, session.end_state)

    def _stream_refusal(self, session: AnswerSession, target: Resource) -> str | None:
        """A reused peer's stream to another resource gets the offer's decision; only allow opens it."""
        live = self.governor.live.get(session.conversation_id)  # the offer's reason and ticket hold for it
        access = {"access": {"reason": live.request.reason, "ticket": live.request.ticket}} if live else {}
        request = self.governor.access_request(session.user, target, session.conversation_id, "tunnel", access)
        decision = self.governor.decide(request)
        if decision.verdict == "allow":
            return None
        if decision.verdict == "hold":
            return f"{target.name} needs approval: start its own session (pam tunnel start {target.name})"
        return f"access to {target.name} denied: {decision.reason}"


def _session_window(data: Any) -> int | None:
    """The terminal window a flow-control client announces in its offer's session (PROTOCOL.md 5)."""
    session = data.get("session") if isinstance(data, dict) else None
    return parse_window(session.get("window")) if isinstance(session, dict) else None


def _message_type(text: str) -> Any:
    try:
        message = parse_json(text, "frame")
    except ProtocolError:
        return None
    return message.get("type") if isinstance(message, dict) else None
