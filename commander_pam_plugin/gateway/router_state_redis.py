"""Router state in Redis, for several router nodes (redis.asyncio; Debian's redis-server).

Keys (every one with a TTL that its writer refreshes each ttl/3 seconds, so a dead node's keys
vanish within `ttl`):
  {prefix}node:{node}   this node is alive
  {prefix}gw:{name}     a gateway's presence: its node, what it serves, its open sessions
  {prefix}conv:{id}     a conversation's owner, home node and confirmed gateway
Messages between nodes are Redis pub/sub on {prefix}to:{node}; PUBLISH answers how many nodes
heard it, so a message to a dead node fails at once instead of timing out. When Redis goes
away every request that needs it gets a 503 and the node keeps retrying; once it is back the
heartbeat writes this node's keys again, so nothing needs a restart.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from .router_state import ConversationRecord, GatewayPresence, Handler, RouterState, StateUnavailable

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 6.0
DEFAULT_PREFIX = "pam:"
OP_TIMEOUT_S = 5.0  # generous: a loaded machine answers late, and a timeout fails the request
RETRY_MIN_S, RETRY_MAX_S = 0.05, 2.0

# Set the presence unless another node holds a newer link of that gateway; returns the holder.
_ANNOUNCE = """
local current = redis.call('GET', KEYS[1])
if current then
  local held = cjson.decode(current)
  if held.node ~= ARGV[2] and tonumber(held.linked_at) > tonumber(ARGV[3]) then return held.node end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
return ARGV[2]
"""
# Delete the presence only if this node still holds it.
_WITHDRAW = """
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current).node == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisState(RouterState):
    def __init__(self, url: str, node: str | None = None, ttl: float = DEFAULT_TTL_S,
                 prefix: str = DEFAULT_PREFIX) -> None:
        super().__init__(node)
        self.url, self.ttl, self.prefix = url, ttl, prefix
        self._redis = redis.from_url(url, socket_timeout=OP_TIMEOUT_S, socket_connect_timeout=OP_TIMEOUT_S,
                                     health_check_interval=max(1, int(ttl / 3)))
        # The subscription has a connection of its own with no read timeout: a slow moment must not
        # drop it (messages published while it resubscribes are lost; pub/sub keeps nothing).
        self._listener = redis.from_url(url, socket_connect_timeout=OP_TIMEOUT_S)
        self._announce = self._redis.register_script(_ANNOUNCE)
        self._withdraw = self._redis.register_script(_WITHDRAW)
        self._announced: dict[str, GatewayPresence] = {}
        self._homed: dict[str, ConversationRecord] = {}
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._handling: set[asyncio.Future[Any]] = set()
        self._down_since: float | None = None
        self.subscribed = asyncio.Event()  # the node listens on its channel (tests and start wait on it)

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    async def start(self, handler: Handler) -> None:
        await super().start(handler)
        self._tasks = [asyncio.ensure_future(self._listen()), asyncio.ensure_future(self._heartbeat()),
                       asyncio.ensure_future(self._flush_presences())]
        try:  # wait for the first subscription, but a node may start while Redis is down
            await asyncio.wait_for(self.subscribed.wait(), OP_TIMEOUT_S * 2)
        except asyncio.TimeoutError:
            log.warning("router node %s: Redis at %s not reachable yet; retrying", self.node, self._safe_url())

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.delete(self._key("node", self.node))
            for name in self._announced:
                await self._withdraw(keys=[self._key("gw", name)], args=[self.node], client=pipe)
            await pipe.execute()
        except (RedisError, OSError):
            pass
        await super().stop()
        await self._redis.aclose()
        await self._listener.aclose()

    def _safe_url(self) -> str:
        """The URL without a password, for logs."""
        scheme, sep, rest = self.url.partition("://")
        return f"{scheme}{sep}{rest.rpartition('@')[2]}"

    def _failed(self, exc: BaseException) -> StateUnavailable:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("router node %s: Redis unavailable (%s)", self.node, exc.__class__.__name__)
        return StateUnavailable("Redis unreachable")

    def _up(self) -> None:
        if self._down_since is not None:
            log.warning("router node %s: Redis reachable again after %.1f s", self.node,
                        time.monotonic() - self._down_since)
            self._down_since = None

    # --- background ------------------------------------------------------------------------

    async def _listen(self) -> None:
        """Receive this node's messages; resubscribe after any Redis outage."""
        delay = RETRY_MIN_S
        channel = self._key("to", self.node)
        while True:
            pubsub = self._listener.pubsub()
            try:
                await pubsub.subscribe(channel)
                self.ops["subscribe"] += 1
                self.subscribed.set()
                self._up()
                delay = RETRY_MIN_S
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.ttl / 3)
                    if message is None:
                        await pubsub.ping()
                        continue
                    if message.get("type") == "message":
                        self._spawn(message["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                self._failed(exc)
            finally:
                try:
                    await pubsub.aclose()
                except (RedisError, OSError):
                    pass
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, RETRY_MAX_S)

    def _spawn(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            log.warning("router node %s: a malformed message on its channel", self.node)
            return
        if isinstance(message, dict):
            task = asyncio.ensure_future(self._received(message))
            self._handling.add(task)  # a strong reference: the loop keeps only weak ones
            task.add_done_callback(self._handling.discard)
            task.add_done_callback(_log_failure)

    async def _heartbeat(self) -> None:
        """Refresh every key this node owns; rewrite those an emptied Redis lost."""
        while True:
            try:
                await self._refresh()
                self._up()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._failed(exc)
            await asyncio.sleep(self.ttl / 3)

    async def _refresh(self) -> None:
        ttl_ms = int(self.ttl * 1000)
        presences = list(self._announced.values())
        homed = list(self._homed.items())
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(self._key("node", self.node), "1", px=ttl_ms)
        for presence in presences:
            await self._announce(keys=[self._key("gw", presence.name)], client=pipe,  # reloaded if Redis restarted
                           args=[presence.to_json(), self.node, repr(presence.linked_at), ttl_ms])
        for conversation_id, record in homed:
            pipe.set(self._key("conv", conversation_id), record.to_json(), px=ttl_ms)
        self.ops["heartbeat"] += 1 + len(presences) + len(homed)
        results = await pipe.execute()
        for presence, holder in zip(presences, results[1:1 + len(presences)]):
            holder = holder.decode() if isinstance(holder, bytes) else holder
            if holder != self.node and self._announced.get(presence.name) is presence:
                del self._announced[presence.name]
                replaced = getattr(self, "_replaced", None)
                if replaced is not None:
                    replaced(presence.name)

    async def _flush_presences(self) -> None:
        """Write announced presences soon after they change, coalescing bursts into one write."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._refresh_presences()
            except (RedisError, OSError) as exc:
                self._failed(exc)  # the heartbeat writes them once Redis is back

    async def _refresh_presences(self) -> None:
        ttl_ms = int(self.ttl * 1000)
        presences = list(self._announced.values())
        if not presences:
            return
        pipe = self._redis.pipeline(transaction=False)
        for presence in presences:
            await self._announce(keys=[self._key("gw", presence.name)], client=pipe,  # reloaded if Redis restarted
                           args=[presence.to_json(), self.node, repr(presence.linked_at), ttl_ms])
        self.ops["announce"] += len(presences)
        await pipe.execute()

    # --- gateway presence ------------------------------------------------------------------

    async def announce(self, presence: GatewayPresence) -> None:
        first = presence.name not in self._announced
        self._announced[presence.name] = presence
        if not first:
            self._dirty.set()
            return
        try:  # a new link is visible to every node before its welcome goes out
            await self._announce(keys=[self._key("gw", presence.name)],
                                 args=[presence.to_json(), self.node, repr(presence.linked_at), int(self.ttl * 1000)])
            self.ops["announce"] += 1
        except (RedisError, OSError) as exc:
            self._failed(exc)  # kept in _announced: the heartbeat writes it once Redis is back

    async def withdraw(self, gateway: str) -> None:
        self._announced.pop(gateway, None)
        try:
            await self._withdraw(keys=[self._key("gw", gateway)], args=[self.node])
            self.ops["withdraw"] += 1
        except (RedisError, OSError) as exc:
            self._failed(exc)  # the key expires within ttl

    async def presences(self, names: tuple[str, ...]) -> dict[str, GatewayPresence]:
        if not names:
            return {}
        try:
            values = await self._redis.mget([self._key("gw", name) for name in names])
            self.ops["mget"] += 1
        except (RedisError, OSError) as exc:
            raise self._failed(exc) from None
        found = {}
        for value in values:
            if value is not None:
                try:
                    presence = GatewayPresence.from_json(value)
                except (ValueError, KeyError, TypeError):
                    continue
                found[presence.name] = presence
        return found

    # --- conversations ---------------------------------------------------------------------

    async def claim(self, conversation_id: str, owner: str) -> ConversationRecord:
        record = ConversationRecord(owner, self.node)
        key = self._key("conv", conversation_id)
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(key, record.to_json(), nx=True, px=int(self.ttl * 1000))
            pipe.get(key)
            created, value = await pipe.execute()
            self.ops["claim"] += 2
        except (RedisError, OSError) as exc:
            raise self._failed(exc) from None
        stored = ConversationRecord.from_json(value) if value is not None else record
        if stored.home == self.node:
            self._homed[conversation_id] = stored
        return stored

    async def rehome(self, conversation_id: str, record: ConversationRecord) -> None:
        if record.home == self.node:
            self._homed[conversation_id] = record
        else:
            self._homed.pop(conversation_id, None)
        try:
            await self._redis.set(self._key("conv", conversation_id), record.to_json(), px=int(self.ttl * 1000))
            self.ops["rehome"] += 1
        except (RedisError, OSError) as exc:
            raise self._failed(exc) from None

    async def release(self, conversation_id: str) -> None:
        if self._homed.pop(conversation_id, None) is None:
            return
        try:
            await self._redis.delete(self._key("conv", conversation_id))
            self.ops["release"] += 1
        except (RedisError, OSError) as exc:
            self._failed(exc)  # it expires within ttl

    async def lookup(self, conversation_id: str) -> ConversationRecord | None:
        try:
            value = await self._redis.get(self._key("conv", conversation_id))
            self.ops["lookup"] += 1
        except (RedisError, OSError) as exc:
            raise self._failed(exc) from None
        return ConversationRecord.from_json(value) if value is not None else None

    # --- messages --------------------------------------------------------------------------

    async def send(self, node: str, message: dict[str, Any]) -> bool:
        if node == self.node:
            await self._received(message)
            return True
        try:
            heard = await self._redis.publish(self._key("to", node), json.dumps(message, separators=(",", ":")))
            self.ops["publish"] += 1
        except (RedisError, OSError) as exc:
            raise self._failed(exc) from None
        return bool(heard)


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        if not isinstance(exc, StateUnavailable):
            log.error("router state: handling a message failed", exc_info=exc)
