"""The single-process router's state: plain dicts, no Redis (the embedded default).

There is one node, so every conversation is homed here and no message ever leaves it; the
router's own conversation table is the only record of owners (as before this interface).
"""
from __future__ import annotations

from typing import Any

from .router_state import ConversationRecord, GatewayPresence, RouterState


class MemoryState(RouterState):
    def __init__(self, node: str | None = None) -> None:
        super().__init__(node or "local")
        self._presences: dict[str, GatewayPresence] = {}

    async def announce(self, presence: GatewayPresence) -> None:
        self._presences[presence.name] = presence

    async def withdraw(self, gateway: str) -> None:
        self._presences.pop(gateway, None)

    async def presences(self, names: tuple[str, ...]) -> dict[str, GatewayPresence]:
        return {name: self._presences[name] for name in names if name in self._presences}

    async def claim(self, conversation_id: str, owner: str) -> ConversationRecord:
        return ConversationRecord(owner, self.node)

    async def rehome(self, conversation_id: str, record: ConversationRecord) -> None:
        return None

    async def release(self, conversation_id: str) -> None:
        return None

    async def lookup(self, conversation_id: str) -> ConversationRecord | None:
        return None  # the router's own table is the record

    async def send(self, node: str, message: dict[str, Any]) -> bool:
        if node != self.node:
            return False
        await self._received(message)
        return True
