"""Per-stream flow control on data channels: credit the receiver grants as its local side drains.

aiortc hands every received SCTP message to a callback at once and cannot pause one stream,
so SCTP's own window never reflects a slow local reader. The receiver therefore grants
credit itself: `{"op": "credit", "limit": L}` in-band on the stream means "you may send
until your total payload on this stream reaches L bytes". Limits are cumulative, so a grant
is never lost or double-counted whatever was in flight when it was sent, and a peer that
never grants (an older one) is simply never limited (docs/PROTOCOL.md section 5).

Sender: `SendCredit` (how much it may still send; waits on an event, never polls).
Receiver: `ReceiveWindow` (what it holds, what it grants, and the bound it enforces on a
peer that ignores credit), optionally charged to a session-wide `BufferBudget`.
"""
from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

from . import protocol

CREDIT_OP = "credit"
DEFAULT_WINDOW = 1024 * 1024  # per stream and direction: at 100 ms RTT still ~10 MB/s per stream
MIN_WINDOW = 64 * 1024
MAX_WINDOW = 64 * 1024 * 1024


def parse_window(value: Any) -> int | None:
    """A peer's advertised window ('window' in open/opened): None when absent or not sane."""
    if isinstance(value, int) and not isinstance(value, bool) and MIN_WINDOW <= value <= MAX_WINDOW:
        return value
    return None


def credit_message(limit: int) -> str:
    return protocol.control_message(CREDIT_OP, limit=limit)


def parse_credit(message: dict[str, Any]) -> int | None:
    """The limit of a credit message, or None if it is not a usable one."""
    limit = message.get("limit")
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < 2 ** 62:
        return limit
    return None


class SendCredit:
    """How far the remote lets this side send on one stream. Unlimited until a first grant."""

    def __init__(self, limit: int | None = None) -> None:
        self.sent = 0
        self.limit = limit
        self._changed = asyncio.Event()
        self._closed = False

    @property
    def allowance(self) -> int | None:
        """Bytes that may be sent now; None means unlimited (a peer without credit)."""
        if self.limit is None:
            return None
        return max(0, self.limit - self.sent)

    def grant(self, limit: int) -> None:
        if self.limit is None or limit > self.limit:
            self.limit = limit
            self._changed.set()

    def spend(self, size: int) -> None:
        self.sent += size

    def close(self) -> None:
        """Wake any waiter: the stream is gone."""
        self._closed = True
        self._changed.set()

    async def wait(self) -> int | None:
        """Until some credit is available (or the stream closed): the allowance then."""
        while not self._closed and self.allowance == 0:
            self._changed.clear()
            await self._changed.wait()
        return self.allowance


class BufferBudget:
    """Bytes received and not yet delivered, summed over every stream of one session."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def charge(self, size: int) -> bool:
        self.used += size
        return self.used <= self.limit

    def release(self, size: int) -> None:
        self.used -= size


class ReceiveWindow:
    """The receiving side of one stream: grants credit as bytes are delivered, enforces a bound."""

    def __init__(self, window: int = DEFAULT_WINDOW, bound: int | None = None,
                 budget: BufferBudget | None = None) -> None:
        self.window = window
        self.bound = bound  # None: no bound (a client trusting its own gateway)
        self.budget = budget
        self.received = 0
        self.delivered = 0
        self.granted = window  # the initial window is announced with the stream (open/opened)
        self.peak = 0

    @property
    def buffered(self) -> int:
        return self.received - self.delivered

    def receive(self, size: int) -> str | None:
        """Count arrived payload; a reason if the sender went past what may be held."""
        self.received += size
        self.peak = max(self.peak, self.buffered)
        over_budget = self.budget is not None and not self.budget.charge(size)
        if self.bound is not None and self.buffered > self.bound:
            return (f"the stream holds {self.buffered} bytes not yet delivered; the limit is {self.bound} "
                    "(the sender ignored flow control)")
        if over_budget:
            assert self.budget is not None
            return (f"the session holds {self.budget.used} bytes not yet delivered; "
                    f"the limit is {self.budget.limit}")
        return None

    def deliver(self, size: int) -> int | None:
        """Count payload written out locally; a new limit to grant when a quarter window freed up."""
        self.delivered += size
        if self.budget is not None:
            self.budget.release(size)
        limit = self.delivered + self.window
        if limit - self.granted >= self.window // 4:
            self.granted = limit
            return limit
        return None

    def release(self) -> None:
        """The stream ended: give its held bytes back to the session budget."""
        if self.budget is not None:
            self.budget.release(self.buffered)
            self.budget = None
        self.delivered = self.received


def reset_connection(writer: asyncio.StreamWriter) -> None:
    """Close a TCP connection with a reset (SO_LINGER 0), not a FIN: the end was not normal.

    An application with an unframed protocol reads EOF as "finished"; a cut transfer must
    read as ECONNRESET instead."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()
