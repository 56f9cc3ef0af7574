"""Held offers waiting for an approver: who asked, who may answer, and the answer once given.

An approver must be named by the resource's rules (or the deciding plugin) and must not be the
requester: a user never approves their own request, whatever the config says.
"""
from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from ..protocol import ProtocolError


@dataclass
class PendingRequest:
    """One held offer; `answer` resolves to (approved, approver, reason)."""

    id: str
    user: str
    resource: str
    conversation_id: str
    mode: str
    approvers: tuple[str, ...]
    reason: str | None
    ticket: str | None
    created: float = field(default_factory=time.time)
    answer: "asyncio.Future[tuple[bool, str, str]]" = field(
        default_factory=lambda: asyncio.get_running_loop().create_future(), repr=False)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "user": self.user, "resource": self.resource, "mode": self.mode,
                "approvers": list(self.approvers), "reason": self.reason, "ticket": self.ticket,
                "since": self.created}


class Approvals:
    """The gateway's pending requests, by request id (and found by conversation)."""

    def __init__(self) -> None:
        self.pending: dict[str, PendingRequest] = {}

    def open(self, user: str, resource: str, conversation_id: str, mode: str, approvers: tuple[str, ...],
             reason: str | None, ticket: str | None) -> PendingRequest:
        request = PendingRequest(secrets.token_hex(4), user, resource, conversation_id, mode,
                                 tuple(a for a in approvers if a != user), reason, ticket)
        self.pending[request.id] = request
        return request

    def decide(self, request_id: str, approver: str, approve: bool, reason: str = "") -> PendingRequest:
        """Record an approver's answer; ProtocolError (404/403) if there is nothing they may answer."""
        request = self.pending.get(request_id)
        if request is None:
            raise ProtocolError(404, f"no pending request {request_id[:16]!r}", "not_found")
        if approver == request.user:
            raise ProtocolError(403, f"{approver} may not approve their own request", "forbidden")
        if approver not in request.approvers:
            raise ProtocolError(403, f"{approver} is not an approver of {request.resource}", "forbidden")
        del self.pending[request_id]
        if not request.answer.done():
            request.answer.set_result((approve, approver, reason))
        return request

    def withdraw(self, conversation_id: str) -> PendingRequest | None:
        """The requester gave up (closed, timed out): forget the request."""
        for request in list(self.pending.values()):
            if request.conversation_id == conversation_id:
                del self.pending[request.id]
                if not request.answer.done():
                    request.answer.cancel()
                return request
        return None

    def listing(self, approver: str | None = None) -> list[dict[str, Any]]:
        """Pending requests (only those `approver` may answer, if named)."""
        return [r.describe() for r in self.pending.values() if approver is None or approver in r.approvers]
