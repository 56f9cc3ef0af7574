"""The signaling router: client actions over HTTP, conversation streams and gateway links.

Clients POST actions with a bearer token; the router forwards each to the gateway's
WebSocket and returns its reply. An action may name its gateway, or only its resource: the
router then finds the gateway from the resources each gateway announced in its hello, so a
fresh client needs no resource listing before its offer. Every input is validated with
protocol.py, every failure is a JSON error with one line of reason, and an offline gateway is
reported at once, by name.
"""
from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import math
import random
import socket
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import WSMsgType, web

from ..protocol import (MAX_BODY_BYTES, MAX_WS_MESSAGE_BYTES, PROTOCOL_VERSION, Action, ProtocolError,
                        check_conversation_id, check_name, parse_json, parse_json_body, validate_action)
from . import client_errors
from .client_errors import MAX_HEADER_BYTES, HttpError, JsonErrorRunner, client_caused, error_response
from .config import RouterSettings
from .router_state import (ConversationRecord, GatewayPresence, NodeGone, RouterState, StateUnavailable,
                           build_state)

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
HELLO_TIMEOUT_S = 10.0
EARLY_EVENTS = 64
EARLY_EVENT_TTL_S = 60.0
STATS_HISTORY = 4096
EVENT_TYPES = ("answer", "candidates", "state", "error")
CLOSE_BAD_CREDENTIALS = 4401
CLOSE_BAD_HELLO = 4400
CLOSE_REPLACED = 4409
MAX_NAMES_IN_ERROR = 50
class TokenBucket:
    """Per-token action rate limit: `rate` per second, bursts up to `burst`."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0 if allowed, else the seconds until one action is allowed again."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass(frozen=True)
class AnnouncedResource:
    """A resource as its gateway announced it: name, kind and allow list (never host or credentials)."""

    name: str
    kind: str
    users: frozenset[str] | None  # None: every user

    def allows(self, user: str) -> bool:
        return self.users is None or user in self.users

    def public(self, gateway: str) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind, "gateway": gateway}


@dataclass
class GatewayLink:
    """An online gateway: its WebSocket, what it announced, and actions awaiting replies."""

    name: str
    ws: web.WebSocketResponse
    version: str
    capabilities: list[str]
    # None: the gateway announced no list (older than this field); it is asked on every listing.
    resources: tuple[AnnouncedResource, ...] | None = None
    pending: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    linked_at: float = field(default_factory=time.time)
    open: set[str] = field(default_factory=set)  # conversations with an accepted offer, not yet ended

    @property
    def sessions(self) -> int:
        return len(self.open)

    def fail_pending(self, message: str) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(HttpError(503, message, "gateway_offline"))
        self.pending.clear()


@dataclass
class RemoteGateway:
    """A gateway linked to another router node: actions reach it through that node."""

    name: str
    node: str
    version: str
    capabilities: list[str]
    resources: tuple[AnnouncedResource, ...] | None
    sessions: int


class _StreamOut:
    """Ordered delivery to one client stream, so a slow client never blocks a gateway link."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def put(self, event: dict[str, Any]) -> None:
        self.queue.put_nowait(event)

    def finish(self) -> None:
        self.queue.put_nowait(None)

    async def run(self) -> None:
        try:
            while (event := await self.queue.get()) is not None:
                await self.ws.send_json(event)
        except (ConnectionError, RuntimeError):
            return
        await self.ws.close()


@dataclass
class Conversation:
    """A conversation as the router knows it. Its gateway binding counts only once `confirmed`:
    once that gateway accepted an action of the owner on it. Until then events are held, and a
    refusal undoes the binding, so after a router restart a stranger who names someone else's
    conversation id never receives its events (the gateway, which still knows the owner, decides)."""

    id: str
    owner: str
    gateway: str | None = None
    stream: _StreamOut | None = None
    early: deque[tuple[float, dict[str, Any]]] = field(default_factory=lambda: deque(maxlen=EARLY_EVENTS))
    confirmed: bool = False
    held: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=EARLY_EVENTS))
    peer_live: bool = False  # the gateway said "connected" and has not said "closed"/"failed" since
    touched: float = field(default_factory=time.monotonic)

    def deliver(self, event: dict[str, Any]) -> None:
        if not self.confirmed:
            self.held.append(event)
        elif self.stream is not None:
            self.stream.put(event)
        else:
            self.early.append((time.monotonic(), event))

    def confirm(self) -> None:
        """The gateway accepted the owner's action: the binding stands and held events go out."""
        if not self.confirmed:
            self.confirmed = True
            held, self.held = list(self.held), deque(maxlen=EARLY_EVENTS)
            for event in held:
                self.deliver(event)

    def attach(self, stream: _StreamOut) -> None:
        """A new stream gets 'ready', then every event kept while none was open."""
        if self.stream is not None:
            self.stream.finish()
        self.stream = stream
        stream.put({"type": "ready"})
        horizon = time.monotonic() - EARLY_EVENT_TTL_S
        for stamp, event in self.early:
            if stamp >= horizon:
                stream.put(event)
        self.early.clear()


class Router:
    """The aiohttp application and its state; start() serves it on one address."""

    def __init__(self, settings: RouterSettings, state: RouterState | None = None) -> None:
        self.settings = settings
        # Shared with the other router nodes (Redis), or this process's alone (memory).
        self.state = state or build_state(settings.state_url, settings.node, settings.state_ttl)
        self.gateways: dict[str, GatewayLink] = {}  # linked to this node
        self._remote_online: set[str] = set()  # linked to other nodes, as last seen
        self._event_homes: OrderedDict[str, str] = OrderedDict()  # conversation -> home node (remote homes)
        self._outgoing: asyncio.Queue[tuple[str, str, dict[str, Any]]] = asyncio.Queue()
        self._relayer: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Future[Any]] = set()
        self.conversations: dict[str, Conversation] = {}
        # Valid actions received, per kind and per conversation (benchmarks count icecandidate).
        self.stats: Counter[str] = Counter()
        self.conversation_stats: OrderedDict[str, Counter[str]] = OrderedDict()
        # HTTP requests per "METHOD /route" (tests check that a cold client lists no resources).
        self.requests: Counter[str] = Counter()
        self.url: str | None = None
        self._known_gateways = {g.name: g for g in settings.gateways}
        self._buckets: dict[str, TokenBucket] = {}
        self._ids = itertools.count(1)
        self._observers: list[Callable[[str, str, str], None]] = []
        self._sockets: set[web.WebSocketResponse] = set()
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.app = self._build_app()

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        app.add_routes([
            web.get("/api/v1/health", self._health),
            web.get("/api/v1/resources", self._resources),
            web.get("/api/v1/gateways/{gateway}", self._gateway_status),
            web.post("/api/v1/gateways/{gateway}/actions", self._action),
            web.post("/api/v1/resources/{resource}/actions", self._resource_action),
            web.get("/api/v1/conversations/{conversation_id}/stream", self._stream),
            web.get("/api/v1/gateway/connect", self._gateway_connect),
        ])
        app.on_shutdown.append(self._close_sockets)
        return app

    def observe(self, callback: Callable[[str, str, str], None]) -> None:
        """callback(gateway, direction 'in'|'out', frame) for every gateway-link frame (diagnostics)."""
        self._observers.append(callback)

    async def start(self, host: str | None = None, port: int | None = None) -> str:
        """Serve on host:port (port 0: any free port); returns the base URL."""
        host = host or self.settings.host
        port = self.settings.port if port is None else port
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {host}:{port} ({exc.strerror})") from None
        self._runner = JsonErrorRunner(self.app, shutdown_timeout=2.0, max_line_size=MAX_HEADER_BYTES,
                                       max_field_size=MAX_HEADER_BYTES)
        await self._runner.setup()
        ssl_context = None
        if self.settings.tls_cert is not None and self.settings.tls_key is not None:
            from .tls import server_context  # HTTPS/WSS from the [router] tls_cert / tls_key

            ssl_context = server_context(self.settings.tls_cert, self.settings.tls_key)
        await web.SockSite(self._runner, sock, ssl_context=ssl_context).start()
        bound = sock.getsockname()[1]
        scheme = "https" if ssl_context is not None else "http"
        self.url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{bound}"
        self._sweeper = asyncio.ensure_future(self._sweep())
        log.info("router listening on %s", self.url)
        for identity in self.settings.gateways:
            if not identity.only_listed:
                log.info("router: gateway %s may also serve resources the config gives to no gateway "
                         "(list them in its [[gateways]] resources to allow only those)", identity.name)
        await self._start_state()
        return self.url

    async def _start_state(self) -> None:
        """Join the other router nodes (shared state), or keep everything here (in memory)."""
        self.state.on_replaced(self._replaced)
        await self.state.start(self._on_node_message)
        self._relayer = asyncio.ensure_future(self._relay_remote())
        if self.settings.state_url:
            log.info("router node %s shares its state with the other nodes", self.state.node)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._relayer is not None:
            self._relayer.cancel()
            await asyncio.gather(self._relayer, return_exceptions=True)
            self._relayer = None
            await self.state.stop()

    async def _sweep(self) -> None:
        """Free idle conversations on a steady beat (the per-user cap also sweeps on demand)."""
        interval = min(max(self.settings.conversation_timeout / 4, 0.05), 10.0)
        while True:
            await asyncio.sleep(interval)
            self.expire_idle()

    def expire_idle(self) -> int:
        """Free every conversation with no stream, no live peer (on an online gateway) and no
        action or event for conversation_timeout; returns how many were freed."""
        horizon = time.monotonic() - self.settings.conversation_timeout
        idle = [c for c in self.conversations.values()
                if c.stream is None and c.touched < horizon
                and not (c.peer_live and c.gateway is not None and self._is_online(c.gateway))]
        for conversation in idle:
            self._drop(conversation.id)
        if idle:
            log.info("router: freed %d idle conversations", len(idle))
        return len(idle)

    async def _close_sockets(self, app: web.Application) -> None:
        await asyncio.gather(*(ws.close(code=1001, message=b"router shutting down") for ws in list(self._sockets)),
                             return_exceptions=True)

    # --- errors, auth, limits --------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        """ProtocolError -> its status; aiohttp's HTML errors -> JSON; anything else -> JSON 500."""
        route = request.match_info.route.resource
        if route is not None:  # matched routes only: their number bounds the counter
            self.requests[f"{request.method} {route.canonical}"] += 1
        try:
            return await handler(request)
        except ProtocolError as exc:
            if exc.status == 400:
                client_errors.mistakes.warn(f"router: refused {request.method[:16]} {_route(request)} from "
                              f"{request.remote}: {exc.message}")
            return error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(HttpError(exc.status, _http_reason(exc, request)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if client_caused(exc) is not None:  # e.g. a body that is not the Content-Encoding it claims
                error = HttpError(400, "the request body could not be read (bad Content-Encoding or framing)")
                client_errors.mistakes.warn(f"router: refused {request.method[:16]} {_route(request)} from "
                              f"{request.remote}: {error.message}")
                return error_response(error)
            log.exception("router: unexpected error on %s %s", request.method, request.path[:200])
            return error_response(HttpError(500, "internal error in the router; see its log"))

    def _user(self, request: web.Request) -> str:
        """The user whose token this is; every token is compared in constant time. A gateway's
        token never counts as a user's (config refuses the overlap; this holds without it)."""
        token = _bearer(request)
        found = None
        for user in self.settings.users:
            if hmac.compare_digest(token, user.token.encode()):
                found = user.name
        if found is not None and any(hmac.compare_digest(token, g.token.encode()) for g in self.settings.gateways):
            found = None
        if found is None:
            raise HttpError(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
        return found

    def _rate_limit(self, user: str) -> None:
        bucket = self._buckets.get(user)
        if bucket is None:
            bucket = self._buckets[user] = TokenBucket(self.settings.rate_limit, self.settings.rate_burst)
        wait = bucket.take()
        if wait:
            raise HttpError(429, f"too many actions; retry in {wait:.2f} s",
                            headers={"Retry-After": str(max(1, math.ceil(wait)))})

    def _known(self, name: str) -> str:
        try:
            check_name(name, "gateway")
        except ProtocolError:
            raise HttpError(404, "unknown gateway") from None
        if name not in self._known_gateways:
            raise HttpError(404, f"unknown gateway {name}")
        return name

    def _is_online(self, name: str) -> bool:
        return name in self.gateways or name in self._remote_online

    async def _targets(self) -> dict[str, GatewayLink | RemoteGateway]:
        """Every online gateway: linked here, or (shared state) linked to another node."""
        targets: dict[str, GatewayLink | RemoteGateway] = dict(self.gateways)
        if self.settings.state_url:
            names = tuple(n for n in self._known_gateways if n not in self.gateways)
            for name, presence in (await self.state.presences(names)).items():
                if presence.node != self.state.node:
                    targets[name] = _remote(presence)
            self._remote_online = {n for n, t in targets.items() if isinstance(t, RemoteGateway)}
        return targets

    async def _online(self, name: str) -> GatewayLink | RemoteGateway:
        link = self.gateways.get(name)
        if link is not None:
            return link
        remote = (await self._targets()).get(name)
        if remote is None:
            raise HttpError(503, f"gateway {name} is offline (not connected to this router)", "gateway_offline")
        return remote

    def _owned(self, conversation_id: str, user: str) -> Conversation | None:
        """The conversation if it exists; 403 if another user holds it."""
        conversation = self.conversations.get(conversation_id)
        if conversation is not None and not hmac.compare_digest(conversation.owner.encode(), user.encode()):
            raise HttpError(403, f"conversation {conversation_id} belongs to another user")
        return conversation

    def _bind(self, conversation_id: str, user: str, gateway: str | None) -> tuple[Conversation, bool, bool]:
        """The conversation, bound to the first user who touches it: (conversation, created, gateway
        newly bound). A gateway binding made here is tentative until that gateway accepts the action."""
        conversation = self._owned(conversation_id, user)
        created = conversation is None
        if conversation is None:
            limit = self.settings.max_conversations_per_user
            owned = sum(1 for c in self.conversations.values() if c.owner == user)
            if owned >= limit and self.expire_idle():
                owned = sum(1 for c in self.conversations.values() if c.owner == user)
            if owned >= limit:
                raise HttpError(429, f"user {user} has {owned} open conversations (the limit is {limit}); "
                                     f"close some first")
            conversation = self.conversations[conversation_id] = Conversation(conversation_id, user)
        conversation.touched = time.monotonic()
        newly_bound = False
        if gateway is not None:
            if conversation.gateway is None:
                conversation.gateway, newly_bound = gateway, True
            elif conversation.gateway != gateway:
                raise HttpError(409, f"conversation {conversation_id} is in use with gateway {conversation.gateway}")
        return conversation, created, newly_bound

    def _drop(self, conversation_id: str) -> None:
        conversation = self.conversations.pop(conversation_id, None)
        if conversation is not None and conversation.stream is not None:
            conversation.stream.finish()
        if conversation is not None:
            self._release(conversation_id)

    def _release(self, conversation_id: str) -> None:
        """Free the shared record too (in the background: the drop itself never waits on Redis)."""
        if self.settings.state_url:
            self._background(self.state.release(conversation_id))

    def _background(self, coro: Any) -> None:
        """A state write nobody waits for, kept referenced until done (the loop holds weak ones)."""
        task = asyncio.ensure_future(coro)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        task.add_done_callback(_quiet)

    def _count(self, action: Action) -> None:
        self.stats[action.kind] += 1
        if action.conversation_id:
            per = self.conversation_stats.get(action.conversation_id)
            if per is None:
                per = self.conversation_stats[action.conversation_id] = Counter()
                while len(self.conversation_stats) > STATS_HISTORY:
                    self.conversation_stats.popitem(last=False)
            per[action.kind] += 1

    # --- client HTTP -----------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "version": PROTOCOL_VERSION})

    async def _gateway_status(self, request: web.Request) -> web.Response:
        self._user(request)
        link = await self._online(self._known(request.match_info["gateway"]))
        return web.json_response({"ok": True, "gateway": link.name, "online": True, "version": link.version,
                                  "capabilities": link.capabilities})

    async def _resources(self, request: web.Request) -> web.Response:
        """From the gateways' announcements; a gateway that announced none is asked (older ones)."""
        user = self._user(request)
        self._rate_limit(user)  # it may ask every gateway at once: it counts like an action
        links = list((await self._targets()).values())
        resources = [r.public(link.name) for link in links if link.resources is not None
                     for r in link.resources if r.allows(user)]  # announcements were checked at hello
        silent = [link for link in links if link.resources is None]
        replies = await asyncio.gather(*(self.call(link, user, Action("", "resources", {}, False))
                                         for link in silent), return_exceptions=True)
        for link, reply in zip(silent, replies):
            if isinstance(reply, BaseException):
                log.warning("router: gateway %s did not list resources (%s)", link.name, _one_line(reply))
                continue
            for item in reply.get("resources", []) if isinstance(reply.get("resources"), list) else []:
                if isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("kind"), str) \
                        and self.settings.may_serve(link.name, item["name"]):
                    resources.append({"name": item["name"], "kind": item["kind"], "gateway": link.name})
        resources.sort(key=lambda r: (r["gateway"], r["name"]))
        return web.json_response({"ok": True, "resources": resources})

    async def _action(self, request: web.Request) -> web.Response:
        user = self._user(request)
        name = self._known(request.match_info["gateway"])
        action = await self._read_action(request, user)
        return web.json_response(await self._dispatch(user, action, gateway=name))

    async def _resource_action(self, request: web.Request) -> web.Response:
        """An action addressed by resource: sent to the one online gateway that announced it for this user."""
        user = self._user(request)
        resource = request.match_info["resource"]
        try:
            check_name(resource, "resource")
        except ProtocolError:
            raise HttpError(404, "unknown resource") from None
        action = await self._read_action(request, user)
        if action.kind == "offer" and action.data.get("resource") != resource:
            raise HttpError(400, f"the offer names resource {action.data.get('resource')} "
                                 f"but was sent to resource {resource}")
        return web.json_response(await self._dispatch(user, action, resource=resource))

    # --- conversation homes (several router nodes) -----------------------------------------

    async def _dispatch(self, user: str, action: Action, gateway: str | None = None,
                        resource: str | None = None) -> dict[str, Any]:
        """Run the action on its conversation's home node: here, or forwarded to the node that
        holds the conversation (any node answers any request; no load-balancer stickiness)."""
        cid = action.conversation_id
        if not cid or action.kind not in ("offer", "icecandidate", "close"):
            return await self._perform(user, action, gateway, resource)
        home = await self._home(cid, user)
        if home != self.state.node:
            message = {"type": "client_action", "user": user, "gateway": gateway, "resource": resource,
                       "action": _action_json(action)}
            try:
                reply = await self.state.request(home, message, self.settings.reply_timeout + 2)
            except NodeGone:
                await self._take_over(cid, user)
            else:
                if reply.get("ok") is not True:
                    raise HttpError(_status(reply.get("status")), _one_line(reply.get("error") or "refused"),
                                    reply.get("code") if isinstance(reply.get("code"), str) else None)
                return reply.get("payload") or {}
        try:
            return await self._perform(user, action, gateway, resource)
        finally:
            if cid not in self.conversations:
                self._release(cid)  # claimed, never bound (refused): nothing to keep fresh

    async def _home(self, cid: str, user: str) -> str:
        """The node holding this conversation (claimed for this node if nobody holds it)."""
        if cid in self.conversations:
            self._owned(cid, user)
            return self.state.node
        if not self.settings.state_url:
            return self.state.node
        record = await self.state.claim(cid, user)
        if not hmac.compare_digest(record.owner.encode(), user.encode()):
            raise HttpError(403, f"conversation {cid} belongs to another user")
        if record.home == self.state.node:
            self._adopt(cid, record)
        return record.home

    async def _take_over(self, cid: str, user: str) -> None:
        """The conversation's home node died (or its stream moved here): hold it on this node."""
        old = await self.state.lookup(cid)
        gateway = old.gateway if old is not None and old.owner == user else None
        record = ConversationRecord(user, self.state.node, gateway)
        await self.state.rehome(cid, record)
        self._adopt(cid, record)
        if old is not None and old.home != self.state.node:
            try:
                await self.state.send(old.home, {"type": "moved", "conversation_id": cid})
            except StateUnavailable:
                pass

    def _adopt(self, cid: str, record: ConversationRecord) -> None:
        """A local conversation for a record homed here (its confirmed gateway, if it had one)."""
        if cid not in self.conversations and record.gateway is not None:
            conversation = self.conversations[cid] = Conversation(cid, record.owner, record.gateway)
            conversation.confirmed = True

    async def _on_node_message(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """Another node's message: run an action on a gateway linked here, run a client action
        on a conversation homed here, or take an event for a conversation homed here."""
        kind = message.get("type")
        try:
            if kind == "gateway_call":
                return await self._serve_gateway_call(message)
            if kind == "client_action":
                action = validate_action(message.get("action"))
                user = str(message.get("user"))
                return {"ok": True, "payload": await self._perform(
                    user, action, message.get("gateway"), message.get("resource"))}
        except ProtocolError as exc:
            return {"ok": False, "status": exc.status, "error": exc.message, "code": exc.code}
        if kind == "event":
            cid, gateway = message.get("conversation_id"), message.get("gateway")
            if isinstance(cid, str) and isinstance(gateway, str):
                if cid in self.conversations or message.get("hop"):
                    self._relay(gateway, cid, message.get("event"))
                else:  # its home moved: pass it on, once
                    self._outgoing.put_nowait((gateway, cid, message.get("event")))
        elif kind == "moved":
            cid = message.get("conversation_id")
            conversation = self.conversations.pop(cid, None) if isinstance(cid, str) else None
            if conversation is not None and conversation.stream is not None:
                conversation.stream.finish()
        return None

    async def _serve_gateway_call(self, message: dict[str, Any]) -> dict[str, Any]:
        name = message.get("gateway")
        link = self.gateways.get(name) if isinstance(name, str) else None
        if link is None:
            raise HttpError(503, f"gateway {name} went offline", "gateway_offline")
        action = validate_action(message.get("action"))
        if action.conversation_id and isinstance(message.get("from"), str):
            self._event_homes[action.conversation_id] = message["from"]
            self._event_homes.move_to_end(action.conversation_id)
            while len(self._event_homes) > STATS_HISTORY:
                self._event_homes.popitem(last=False)
        data = await self.call(link, str(message.get("user")), action)
        return {"ok": True, "data": data}

    async def _relay_remote(self) -> None:
        """Events for conversations homed on other nodes, sent in order, one at a time."""
        while True:
            gateway, cid, event = await self._outgoing.get()
            try:
                home = self._event_homes.get(cid)
                if home is None or home == self.state.node:
                    record = await self.state.lookup(cid)
                    home = record.home if record is not None else None
                if home is None or home == self.state.node:
                    log.debug("router: dropping an event from %s for an unknown conversation", gateway)
                    continue
                await self.state.send(home, {"type": "event", "gateway": gateway, "conversation_id": cid,
                                             "event": event, "hop": True})
            except StateUnavailable:
                log.debug("router: an event from %s was lost while the shared state was down", gateway)
            except Exception:  # never let one bad event stop every later one
                log.exception("router: relaying an event from %s to another node failed", gateway)

    def _replaced(self, gateway: str) -> None:
        """Another node holds a newer link of this gateway: ours is stale, close it."""
        link = self.gateways.pop(gateway, None)
        if link is not None:
            log.warning("router: gateway %s relinked to another node; closing the stale link here", gateway)
            link.fail_pending(f"gateway {gateway} moved to another router node")
            asyncio.ensure_future(link.ws.close(code=CLOSE_REPLACED, message=b"replaced by a newer connection"))

    def _announce(self, link: GatewayLink) -> None:
        """Tell the other nodes (its session count changed)."""
        if self.gateways.get(link.name) is link:
            self._background(self.state.announce(_presence(link, self.state.node)))

    async def _perform(self, user: str, action: Action, gateway: str | None, resource: str | None
                       ) -> dict[str, Any]:
        if resource is None:
            return await self._forward(await self._online(gateway or ""), user, action)
        tried: set[str] = set()
        while True:  # a pool member that went offline since it was seen: the next one
            target = await self._serving(resource, user, tried)
            try:
                return await self._forward(target, user, action)
            except HttpError as exc:
                if exc.code != "gateway_offline" or action.kind != "offer":
                    raise
                tried.add(target.name)

    async def _read_action(self, request: web.Request, user: str) -> Action:
        """The rate limit, then the body, validated and counted."""
        self._rate_limit(user)
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise HttpError(413, f"body is {request.content_length} bytes; the limit is {MAX_BODY_BYTES}")
        action = validate_action(parse_json_body(await request.read()))
        self._count(action)
        return action

    async def _serving(self, resource: str, user: str, tried: frozenset[str] | set[str] = frozenset()
                       ) -> GatewayLink | RemoteGateway:
        """An online gateway of the resource's pool (the gateways whose [[gateways]] resources list
        it and that announced it for `user`): the one with the fewest open sessions, ties broken
        at random. Several gateways announcing a name no list pins is a 409. A user outside
        its allow list gets the same 404 as for a name nobody serves: it never learns it exists."""
        announcing = [link for link in (await self._targets()).values() if link.resources is not None]
        serving = [link for link in announcing
                   if any(r.name == resource and r.allows(user) for r in link.resources or ())]
        if len(serving) > 1 and not all(resource in self._known_gateways[link.name].resources for link in serving):
            # Not a pool the config made on purpose (it lists the name on each): let the user pick.
            raise HttpError(409, f"resource {resource} is served by several gateways: "
                                 f"{_names(link.name for link in serving)}; resolve it to one")
        if tried and not (serving := [link for link in serving if link.name not in tried]):
            raise HttpError(503, f"every gateway serving {resource} went offline", "gateway_offline")
        if serving:
            fewest = min(link.sessions for link in serving)
            return random.choice([link for link in serving if link.sessions == fewest])
        usable = {r.name for link in announcing for r in link.resources or () if r.allows(user)}
        raise HttpError(404, f"unknown resource {resource}; resources you may use: {_names(usable)}")

    async def _forward(self, link: GatewayLink | RemoteGateway, user: str, action: Action) -> dict[str, Any]:
        """Send a validated action to `link`, binding its conversation; the reply names the gateway.
        The gateway's reply decides the binding: accepted, it stands; refused, a tentative one is undone."""
        if action.kind == "offer" and not self.settings.may_serve(link.name, action.data.get("resource")):
            raise HttpError(404, f"gateway {link.name} does not serve resource {action.data.get('resource')}")
        conversation, created, newly_bound = (self._bind(action.conversation_id, user, link.name)
                                              if action.kind in ("offer", "icecandidate", "close")
                                              else (None, False, False))
        try:
            data = await self.call(link, user, action)
        except ProtocolError:
            if conversation is not None and not conversation.confirmed:
                conversation.held.clear()
                if newly_bound and conversation.gateway == link.name:
                    conversation.gateway = None
                if created and conversation.stream is None:
                    self._drop(action.conversation_id)
            raise
        else:
            if conversation is not None and conversation.gateway == link.name:
                if not conversation.confirmed and self.settings.state_url:
                    await self._record_gateway(conversation)
                conversation.confirm()
        finally:
            if action.kind == "close":  # the client is done with it, whatever the gateway said
                self._drop(action.conversation_id)
        # The gateway's name, version and capabilities ride on every reply, so a client never
        # pays a separate round trip to learn them (nor, addressing by resource, the gateway).
        return {"ok": True, "data": data, "gateway": {
            "name": link.name, "version": link.version, "capabilities": link.capabilities}}

    async def _record_gateway(self, conversation: Conversation) -> None:
        """The confirmed gateway goes into the shared record, so a node taking over keeps it."""
        try:
            await self.state.rehome(conversation.id, ConversationRecord(conversation.owner, self.state.node,
                                                                        conversation.gateway))
        except StateUnavailable:
            log.warning("router: conversation %s confirmed while the shared state was down", conversation.id)

    async def call(self, link: GatewayLink | RemoteGateway, user: str, action: Action) -> dict[str, Any]:
        """Forward one action to a gateway and wait for its reply (504 after reply_timeout)."""
        if isinstance(link, RemoteGateway):
            reply = await self.state.request(link.node, {"type": "gateway_call", "gateway": link.name, "user": user,
                                                         "action": _action_json(action)},
                                             self.settings.reply_timeout + 1)
            if reply.get("ok") is True:
                return reply.get("data") if isinstance(reply.get("data"), dict) else {}
            raise HttpError(_status(reply.get("status")), _one_line(reply.get("error") or "refused"),
                            reply.get("code") if isinstance(reply.get("code"), str) else None)
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        link.pending[request_id] = future
        try:
            await self._send(link, {"type": "action", "id": request_id, "user": user,
                                    "conversation_id": action.conversation_id or None, "kind": action.kind,
                                    "data": action.data, "trickle_ice": action.trickle_ice})
            reply = await asyncio.wait_for(future, self.settings.reply_timeout)
        except asyncio.TimeoutError:
            raise HttpError(504, f"gateway {link.name} did not reply within {self.settings.reply_timeout:g} s") from None
        except (ConnectionError, RuntimeError):
            raise HttpError(503, f"gateway {link.name} went offline", "gateway_offline") from None
        finally:
            link.pending.pop(request_id, None)
        if reply.get("ok") is True:
            data = reply.get("data")
            if action.kind == "offer" and action.conversation_id:
                link.open.add(action.conversation_id)
                self._announce(link)
            elif action.kind == "close" and action.conversation_id in link.open:
                link.open.discard(action.conversation_id)
                self._announce(link)
            return data if isinstance(data, dict) else {}
        status = reply.get("status")
        if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
            status = 502
        raise HttpError(status, _one_line(reply.get("error") or f"gateway {link.name} refused the action"))

    async def _send(self, link: GatewayLink, message: dict[str, Any]) -> None:
        text = json.dumps(message, separators=(",", ":"))
        for observer in self._observers:
            observer(link.name, "out", text)
        await link.ws.send_str(text)

    # --- client stream ---------------------------------------------------------------------

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        user = self._user(request)
        conversation_id = check_conversation_id(request.match_info["conversation_id"])
        self._owned(conversation_id, user)
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=4096)
        if not ws.can_prepare(request).ok:
            raise HttpError(400, "the conversation stream is a WebSocket; send an upgrade request")
        if await self._home(conversation_id, user) != self.state.node:
            await self._take_over(conversation_id, user)  # the stream's node holds the conversation
        conversation, _, _ = self._bind(conversation_id, user, None)
        await ws.prepare(request)
        self._sockets.add(ws)
        out = _StreamOut(ws)
        conversation.attach(out)
        writer = asyncio.ensure_future(out.run())
        try:
            async for _ in ws:
                pass  # clients send nothing on the stream: whatever they send is ignored, the stream lives
        finally:
            self._sockets.discard(ws)
            writer.cancel()
            conversation.touched = time.monotonic()
            if conversation.stream is out:
                conversation.stream = None
                # Nobody listens any more and no gateway will end it (none bound, or its gateway
                # went offline and took the session with it): forget it, or it counts forever.
                gone = conversation.gateway is None or not self._is_online(conversation.gateway)
                if gone and self.conversations.get(conversation_id) is conversation:
                    del self.conversations[conversation_id]
                    self._release(conversation_id)
        return ws

    # --- gateway link ----------------------------------------------------------------------

    async def _gateway_connect(self, request: web.Request) -> web.StreamResponse:
        identity = None
        try:
            token = _bearer(request)
        except HttpError:
            token = b""
        for candidate in self._known_gateways.values():
            if hmac.compare_digest(token, candidate.token.encode()):
                identity = candidate
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=MAX_WS_MESSAGE_BYTES)
        await ws.prepare(request)
        if identity is None:
            log.warning("router: refused a gateway connection from %s (bad token)", request.remote)
            await ws.close(code=CLOSE_BAD_CREDENTIALS, message=b"bad gateway token")
            return ws
        link = await self._hello(ws, identity.name)
        if link is None:
            return ws
        self._sockets.add(ws)
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    self._on_gateway_frame(link, message.data)
        finally:
            self._sockets.discard(ws)
            if self.gateways.get(link.name) is link:
                del self.gateways[link.name]
                log.warning("router: gateway %s went offline", link.name)
                await self.state.withdraw(link.name)
            link.fail_pending(f"gateway {link.name} went offline")
        return ws

    async def _hello(self, ws: web.WebSocketResponse, name: str) -> GatewayLink | None:
        """Read and check the hello; register the link (replacing an older one) and welcome it."""
        try:
            message = await asyncio.wait_for(ws.receive(), HELLO_TIMEOUT_S)
            hello = parse_json(message.data, "hello") if message.type == WSMsgType.TEXT else None
        except (asyncio.TimeoutError, ProtocolError):
            hello = None
        if not isinstance(hello, dict) or hello.get("type") != "hello" or not isinstance(hello.get("version"), str) \
                or not isinstance(hello.get("capabilities", []), list) \
                or not isinstance(hello.get("resources"), (list, type(None))) \
                or not isinstance(hello.get("conversations"), (list, type(None))):
            await ws.close(code=CLOSE_BAD_HELLO, message=b"expected a hello message")
            return None
        if hello.get("gateway") != name:
            log.warning("router: gateway token for %s presented with another name", name)
            await ws.close(code=CLOSE_BAD_CREDENTIALS, message=b"gateway name does not match its token")
            return None
        capabilities = [c for c in hello.get("capabilities", []) if isinstance(c, str) and len(c) <= 32][:16]
        resources = self._permitted(name, _announced(name, hello.get("resources")))
        link = GatewayLink(name, ws, hello["version"][:32], capabilities, resources)
        old = self.gateways.get(name)
        self.gateways[name] = link
        if old is not None:
            old.fail_pending(f"gateway {name} reconnected")
            await old.ws.close(code=CLOSE_REPLACED, message=b"replaced by a newer connection")
        if hello.get("conversations") is not None:
            link.open = {c for c in hello["conversations"] if isinstance(c, str)}
            self._forget_unknown(name, hello["conversations"])
        await self.state.announce(_presence(link, self.state.node))
        await ws.send_json({"type": "welcome"})
        log.info("router: gateway %s online (version %s, capabilities %s, %s)", name, link.version,
                 ",".join(capabilities) or "none",
                 "resources asked per listing" if resources is None else f"{len(resources)} resources announced")
        return link

    def _permitted(self, gateway: str, announced: tuple[AnnouncedResource, ...] | None
                   ) -> tuple[AnnouncedResource, ...] | None:
        """The announced resources this gateway may serve; the others are refused with one WARNING
        and never reach a user (no listing, no offer)."""
        if announced is None:
            return None
        refused = [r.name for r in announced if not self.settings.may_serve(gateway, r.name)]
        if refused:
            log.warning("router: gateway %s announced resources it may not serve, refused: %s",
                        gateway, _names(refused))
        return tuple(r for r in announced if self.settings.may_serve(gateway, r.name))

    def _forget_unknown(self, gateway: str, live: list[Any]) -> None:
        """A (re)connecting gateway lists the conversations it still has: every conversation bound
        to it that it does not list ended with its previous run, so it is freed (and its stream told)."""
        known = {c for c in live if isinstance(c, str)}
        gone = [c for c in self.conversations.values() if c.gateway == gateway and c.id not in known]
        for conversation in gone:
            if conversation.stream is not None and conversation.confirmed:
                conversation.stream.put({"type": "state", "state": "closed",
                                         "reason": f"gateway {gateway} restarted; this conversation is gone"})
            self._drop(conversation.id)
        if gone:
            log.info("router: gateway %s no longer has %d conversations; freed them", gateway, len(gone))

    def _on_gateway_frame(self, link: GatewayLink, text: str) -> None:
        for observer in self._observers:
            observer(link.name, "in", text)
        try:
            message = parse_json(text, "frame")
        except ProtocolError as exc:
            client_errors.mistakes.warn(f"router: gateway {link.name} sent a bad frame: {exc.message}")
            return
        if not isinstance(message, dict):
            return
        if message.get("type") == "reply":
            request_id = message.get("id")
            future = link.pending.get(request_id) if isinstance(request_id, int) else None
            if future is not None and not future.done():
                future.set_result(message)
        elif message.get("type") == "event":
            cid, event = message.get("conversation_id"), message.get("event")
            if isinstance(cid, str) and isinstance(event, dict) and event.get("type") == "state" \
                    and event.get("state") in ("closed", "failed") and cid in link.open:
                link.open.discard(cid)
                self._announce(link)
            if isinstance(cid, str) and cid not in self.conversations and self.settings.state_url:
                self._outgoing.put_nowait((link.name, cid, event))  # homed on another node
            else:
                self._relay(link.name, cid, event)

    def _relay(self, gateway: str, conversation_id: Any, event: Any) -> None:
        """A gateway event to the owner's stream (or kept until it opens)."""
        conversation = self.conversations.get(conversation_id) if isinstance(conversation_id, str) else None
        if conversation is None or conversation.gateway != gateway:
            log.debug("router: dropping an event from %s for an unknown conversation", gateway)
            return
        if not isinstance(event, dict) or event.get("type") not in EVENT_TYPES:
            client_errors.mistakes.warn(f"router: gateway {gateway} sent a malformed event")
            return
        conversation.touched = time.monotonic()
        conversation.deliver(event)
        if event["type"] == "state":
            conversation.peer_live = event.get("state") == "connected"
            if event.get("state") in ("closed", "failed"):
                self._drop(conversation.id)


def _presence(link: GatewayLink, node: str) -> GatewayPresence:
    resources = None if link.resources is None else tuple(
        {"name": r.name, "kind": r.kind, "users": None if r.users is None else sorted(r.users)} for r in link.resources)
    return GatewayPresence(link.name, node, link.version, tuple(link.capabilities), resources, link.sessions,
                           link.linked_at)


def _remote(presence: GatewayPresence) -> RemoteGateway:
    """Another node's gateway; its resources were checked against the config at its hello there."""
    resources = None if presence.resources is None else _announced(presence.name, list(presence.resources))
    return RemoteGateway(presence.name, presence.node, presence.version, list(presence.capabilities),
                         resources, presence.sessions)


def _action_json(action: Action) -> dict[str, Any]:
    return {"conversation_id": action.conversation_id or None, "kind": action.kind, "data": action.data,
            "trickle_ice": action.trickle_ice}


def _status(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599 else 502


def _quiet(task: asyncio.Future[Any]) -> None:
    """A background state write that failed: the heartbeat or the TTL repairs it; just log it."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("router: a background state write failed (%s)", task.exception().__class__.__name__)


def _announced(gateway: str, items: list[Any] | None) -> tuple[AnnouncedResource, ...] | None:
    """The hello's resource list (None: not announced); a malformed entry is skipped and logged."""
    if items is None:
        return None
    announced = []
    for item in items:
        try:
            if not isinstance(item, dict):
                raise ProtocolError(400, "an entry must be an object")
            name, kind = check_name(item.get("name"), "resource"), check_name(item.get("kind"), "kind")
            users = item.get("users")
            if users is not None and not (isinstance(users, list) and all(isinstance(u, str) for u in users)):
                raise ProtocolError(400, "users must be a list of names or null")
        except ProtocolError as exc:
            log.warning("router: gateway %s announced a malformed resource (%s)", gateway, exc.message)
            continue
        announced.append(AnnouncedResource(name, kind, None if users is None else frozenset(users)))
    return tuple(announced)


def _names(names: Any) -> str:
    """Sorted names for a one-line message ('none' if empty; a long list is cut short)."""
    ordered = sorted(names)
    shown = ", ".join(ordered[:MAX_NAMES_IN_ERROR]) or "none"
    return shown if len(ordered) <= MAX_NAMES_IN_ERROR else f"{shown} and {len(ordered) - MAX_NAMES_IN_ERROR} more"


def _bearer(request: web.Request) -> bytes:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise HttpError(401, "missing bearer token (send Authorization: Bearer TOKEN)",
                        headers={"WWW-Authenticate": "Bearer"})
    return token.encode("utf-8", "replace")


def _one_line(value: Any) -> str:
    text = value.message if isinstance(value, ProtocolError) else str(value)
    return " ".join(text.split())[:300] or value.__class__.__name__


def _route(request: web.Request) -> str:
    """The matched route's pattern (never the raw path, which a client chose)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "(no route)"


def _http_reason(exc: web.HTTPException, request: web.Request) -> str:
    if exc.status == 404:
        return "no such endpoint"
    if exc.status == 405:
        return f"method {request.method[:16]} is not allowed here"
    if exc.status == 413:
        return f"body is larger than the limit of {MAX_BODY_BYTES} bytes"
    return _one_line(exc.reason)
