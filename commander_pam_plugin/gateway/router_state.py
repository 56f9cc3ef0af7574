"""What router nodes share: gateway presence, conversation homes, and messages between nodes.

One router process keeps all of it in memory (router_state_memory, the embedded default: no
Redis). Several router nodes share it through Redis (router_state_redis): any node answers any
request, a gateway linked to node B serves a client whose request reached node A, and every
key a node writes expires when that node stops refreshing it, so nothing stays bound to a
dead node. The router (router.py) decides; this only stores and carries.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
from collections import Counter
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from .client_errors import HttpError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]


class StateUnavailable(HttpError):
    """The shared state cannot be reached (Redis down): the request fails now, the node lives on."""

    def __init__(self, detail: str) -> None:
        super().__init__(503, f"router state unavailable ({detail}); retry shortly", "unavailable")


class NodeGone(HttpError):
    """The node a message was for is not listening (it died; its keys expire soon)."""

    def __init__(self, node: str) -> None:
        super().__init__(503, f"router node {node} is gone; retry", "unavailable")
        self.node = node


@dataclass(frozen=True)
class GatewayPresence:
    """A gateway linked to some node, as every node sees it (never its token or resource hosts)."""

    name: str
    node: str
    version: str
    capabilities: tuple[str, ...]
    # [{"name", "kind", "users"}] as announced and permitted; None: it announced no list.
    resources: tuple[dict[str, Any], ...] | None
    sessions: int = 0
    linked_at: float = 0.0  # the link's start (a newer link of the same gateway wins)

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "node": self.node, "version": self.version,
                           "capabilities": list(self.capabilities),
                           "resources": None if self.resources is None else list(self.resources),
                           "sessions": self.sessions, "linked_at": self.linked_at}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> GatewayPresence:
        data = json.loads(text)
        resources = data.get("resources")
        return cls(data["name"], data["node"], data["version"], tuple(data.get("capabilities") or ()),
                   None if resources is None else tuple(resources), int(data.get("sessions") or 0),
                   float(data.get("linked_at") or 0.0))


@dataclass(frozen=True)
class ConversationRecord:
    """Who owns a conversation, which node holds its state (its home) and its confirmed gateway."""

    owner: str
    home: str
    gateway: str | None = None

    def to_json(self) -> str:
        return json.dumps({"owner": self.owner, "home": self.home, "gateway": self.gateway}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ConversationRecord:
        data = json.loads(text)
        return cls(data["owner"], data["home"], data.get("gateway"))


class RouterState:
    """The interface both backends implement, plus request/reply over `send`.

    A message to another node is a dict; one with "rid" expects a reply, which comes back as
    {"reply_to_rid": rid, ...} on the sender's own channel. The router registers one handler
    that answers (or returns None for) every message addressed to this node."""

    def __init__(self, node: str | None = None) -> None:
        self.node = node or "node-" + secrets.token_hex(4)
        self.ops: Counter[str] = Counter()  # operations on the shared store, per kind (benchmarks)
        self._handler: Handler | None = None
        self._rids = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self, handler: Handler) -> None:
        self._handler = handler

    async def stop(self) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(StateUnavailable("this router node is stopping"))
        self._waiting.clear()

    # --- gateway presence ------------------------------------------------------------------

    async def announce(self, presence: GatewayPresence) -> None:
        """A gateway linked here (or its session count changed); kept fresh until withdrawn."""
        raise NotImplementedError

    async def withdraw(self, gateway: str) -> None:
        """The link here ended: forget the presence unless another node holds a newer link."""
        raise NotImplementedError

    async def presences(self, names: tuple[str, ...]) -> dict[str, GatewayPresence]:
        """The live presences among `names` (the gateways the config knows)."""
        raise NotImplementedError

    def on_replaced(self, callback: Callable[[str], None]) -> None:
        """callback(gateway) when another node took over a gateway linked here (a newer link)."""
        self._replaced = callback

    # --- conversations ---------------------------------------------------------------------

    async def claim(self, conversation_id: str, owner: str) -> ConversationRecord:
        """The conversation's record, created with this node as home if it has none."""
        raise NotImplementedError

    async def rehome(self, conversation_id: str, record: ConversationRecord) -> None:
        """Store `record` (a new home or a confirmed gateway); the home keeps it fresh."""
        raise NotImplementedError

    async def release(self, conversation_id: str) -> None:
        """The conversation ended (only its home calls this)."""
        raise NotImplementedError

    async def lookup(self, conversation_id: str) -> ConversationRecord | None:
        """The conversation's record, if any node holds it (never creates one)."""
        raise NotImplementedError

    # --- messages between nodes ------------------------------------------------------------

    async def send(self, node: str, message: dict[str, Any]) -> bool:
        """Deliver one message to `node`; False if no such node is listening."""
        raise NotImplementedError

    async def request(self, node: str, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send a message that expects a reply and wait for it (503 if the node is gone, 504 late)."""
        rid = f"{self.node}:{next(self._rids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        try:
            if not await self.send(node, {**message, "rid": rid, "from": self.node}):
                raise NodeGone(node)
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise HttpError(504, f"router node {node} did not answer within {timeout:g} s") from None
        finally:
            self._waiting.pop(rid, None)

    async def _received(self, message: dict[str, Any]) -> None:
        """A message for this node: a reply wakes its request; anything else goes to the router."""
        rid = message.get("reply_to_rid")
        if isinstance(rid, str):
            future = self._waiting.get(rid)
            if future is not None and not future.done():
                future.set_result(message)
            return
        if self._handler is None:
            return
        try:
            reply = await self._handler(message)
        except Exception:  # the asking node gets a clear 500 at once, not a timeout
            log.exception("router node %s: handling a %s message failed", self.node, str(message.get("type"))[:32])
            reply = {"ok": False, "status": 500, "error": f"internal error on router node {self.node}; see its log"}
        sender, rid = message.get("from"), message.get("rid")
        if isinstance(sender, str) and isinstance(rid, str):
            await self.send(sender, {**(reply or {}), "reply_to_rid": rid})


def build_state(url: str | None, node: str | None = None, ttl: float | None = None) -> RouterState:
    """The in-memory state when no URL is configured, else the Redis one (import only then)."""
    if not url:
        from .router_state_memory import MemoryState
        return MemoryState(node)
    from .router_state_redis import DEFAULT_TTL_S, RedisState
    return RedisState(url, node, ttl or DEFAULT_TTL_S)
