"""Local TCP forwarding over a gateway peer: one negotiated data channel per accepted connection.

SCTP streams give each connection its own ordered channel, so a slow or failing connection
never blocks another (no head-of-line blocking), and a connection the target refuses ends
alone while the tunnel stays up. Runs on the plugin's background loop.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from aiortc import RTCDataChannel
from aiortc.exceptions import InvalidStateError

from . import direct_stream, flow, protocol, sctp_tuning
from .loop import half_close
from .peer import HIGH_WATER, LOW_WATER, ClientPeer

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
OPEN_TIMEOUT_S = 20.0
EOF_MESSAGE = protocol.control_message("eof")


@dataclass
class TunnelStats:
    connections_total: int = 0
    connections_open: int = 0
    bytes_out: int = 0  # local client -> remote target
    bytes_in: int = 0  # remote target -> local client
    refused: int = 0
    last_error: str = ""


class ChannelPump:
    """Moves bytes between one local TCP connection and one data channel, both ways, with half-close.

    Flow control (docs/PROTOCOL.md section 5): upstream reads the local socket only within
    the gateway's credit (a gateway that announced no window is not limited) and while the
    channel's buffer is under the high-water mark; downstream grants the gateway credit as
    the local application reads. An end that is not the remote's eof (gateway lost, target
    reset, stream error) resets the local connection instead of closing it with a FIN.

    On a tuned peer (sctp_tuning) bytes skip the pump's tasks while nothing waits before them:
    local bytes go to the channel in the socket callback when credit and buffer room allow
    (direct_stream.DirectReader), and a received message is written to the local socket in the
    channel's callback when nothing is queued; the tasks carry on with whatever must wait.
    """

    def __init__(self, channel: RTCDataChannel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 stats: TunnelStats, send_limit: int | None = None, window: int = flow.DEFAULT_WINDOW) -> None:
        self.channel = channel
        self.reader = reader
        self.writer = writer
        self.stats = stats
        self.credit = flow.SendCredit(send_limit)
        self.window = flow.ReceiveWindow(window)
        # bytes to write; an int: bytes already written that wait for drain() before their credit
        self._inbound: asyncio.Queue[bytes | int | None] = asyncio.Queue()
        self._direct = sctp_tuning.is_tuned(channel)
        self.direct_sends = self.direct_writes = 0  # messages that skipped a task (tests, benchmarks)
        if self._direct and isinstance(reader, direct_stream.DirectReader):
            reader.sink = self._send_now
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = asyncio.Event()
        self._remote_eof = False
        channel.bufferedAmountLowThreshold = LOW_WATER
        channel.on("bufferedamountlow", self._writable.set)
        channel.on("message", self._on_message)
        channel.on("close", self._on_close)

    @property
    def buffered(self) -> int:
        """Bytes this pump holds for the local application (received, not yet written out)."""
        return self.window.buffered

    def _on_message(self, message: Any) -> None:
        if isinstance(message, bytes):
            self.stats.bytes_in += len(message)
            self.window.receive(len(message))
            if self._direct and self._inbound.empty() and not self._remote_eof:
                pending = direct_stream.write_now(self.writer, message)
                if pending is not None:
                    self.direct_writes += 1
                if pending == 0:
                    self._grant(len(message))
                    return
                if pending is not None:  # written; its credit waits for drain() in _downstream
                    self._inbound.put_nowait(len(message))
                    return
            self._inbound.put_nowait(message)
            return
        try:
            op = protocol.parse_control_message(message)
        except (protocol.ProtocolError, ValueError):
            return
        if op["op"] == flow.CREDIT_OP:
            limit = flow.parse_credit(op)
            if limit is not None:
                self.credit.grant(limit)
        elif op["op"] == "eof":
            self._remote_eof = True
            self._inbound.put_nowait(None)
        elif op["op"] == "error":
            self.stats.last_error = str(op.get("reason", "stream error"))[:200]
            self._on_close()

    def _send_now(self, data: bytes) -> bool:
        """DirectReader's sink: send arriving local bytes at once when credit and buffer room allow."""
        if self._closed.is_set() or self.channel.readyState != "open" or self.channel.bufferedAmount > HIGH_WATER:
            return False
        allowance = self.credit.allowance
        if allowance is not None and allowance < len(data):
            return False
        try:
            for start in range(0, len(data), READ_CHUNK):
                self.channel.send(data[start:start + READ_CHUNK])
        except InvalidStateError:  # closed under us: the stream ends, nothing is sent twice
            self._on_close()
            return True
        self.credit.spend(len(data))
        self.stats.bytes_out += len(data)
        self.direct_sends += 1
        return True

    def _grant(self, size: int) -> None:
        """`size` bytes reached the local socket: credit for the gateway once a quarter window freed up."""
        limit = self.window.deliver(size)
        if limit is not None and self.credit.limit is not None and self.channel.readyState == "open":
            self.channel.send(flow.credit_message(limit))

    def _on_close(self) -> None:
        self._closed.set()
        self._writable.set()
        self.credit.close()
        self._inbound.put_nowait(None)

    async def run(self) -> None:
        upstream = asyncio.ensure_future(self._upstream())
        downstream = asyncio.ensure_future(self._downstream())
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            # ends on the remote's EOF, or when the channel closes; an abnormal close does not
            # wait for a local application that stopped reading (it gets a reset instead)
            await asyncio.wait({downstream, closed}, return_when=asyncio.FIRST_COMPLETED)
            if not downstream.done() and not self._remote_eof:
                downstream.cancel()
            await asyncio.gather(downstream, return_exceptions=True)
            if self._closed.is_set():
                upstream.cancel()
            await asyncio.gather(upstream, return_exceptions=True)
        finally:
            closed.cancel()
            upstream.cancel()
            downstream.cancel()
            if self.channel.readyState == "open":
                self.channel.close()
            if self._remote_eof:
                self.writer.close()
            else:
                flow.reset_connection(self.writer)

    async def _upstream(self) -> None:
        """Local -> channel, within the gateway's credit and under the channel's high-water mark."""
        try:
            while not self._closed.is_set():
                allowance = await self.credit.wait()
                if self._closed.is_set():
                    return
                data = await self.reader.read(READ_CHUNK if allowance is None else min(READ_CHUNK, allowance))
                if self._closed.is_set():
                    return
                if not data:
                    self.channel.send(EOF_MESSAGE)
                    return
                self.channel.send(data)
                self.credit.spend(len(data))
                self.stats.bytes_out += len(data)
                if self.channel.bufferedAmount > HIGH_WATER:
                    self._writable.clear()
                    await self._writable.wait()
        except InvalidStateError:
            self._on_close()
        except (ConnectionError, OSError) as exc:
            self._fail(f"local connection failed: {exc.__class__.__name__}")

    async def _downstream(self) -> None:
        """Channel -> local, in order, with the local socket's own back-pressure; credit as it drains."""
        try:
            while True:
                data = await self._inbound.get()
                if data is None:
                    if not self._closed.is_set():
                        half_close(self.writer)
                    return
                if isinstance(data, int):  # written already (_on_message)
                    await self.writer.drain()
                    self._grant(data)
                    continue
                self.writer.write(data)
                await self.writer.drain()
                self._grant(len(data))
        except (ConnectionError, OSError) as exc:
            self._fail(f"local connection failed: {exc.__class__.__name__}")

    def _fail(self, reason: str) -> None:
        if self.channel.readyState == "open":
            self.channel.send(protocol.control_message("error", reason=reason))
            self.channel.close()
        self._on_close()


_tunnel_ids = itertools.count(1)


@dataclass
class Tunnel:
    """One `pam tunnel start`: a local listener bound to one gateway peer."""

    resource: str
    gateway: str
    host: str
    port: int = 0
    id: str = field(default_factory=lambda: f"t{next(_tunnel_ids)}")
    state: str = "connecting"
    reason: str = ""
    started: float = field(default_factory=time.time)
    stats: TunnelStats = field(default_factory=TunnelStats)
    session: Any = None  # negotiation.Session once connected
    on_lost: Callable[["Tunnel"], None] | None = None
    heal: bool = False  # on loss keep the listener, say "reconnecting": the agent attaches a new session
    stream_resource: str | None = None  # on a reused peer opened for another resource: name ours in each open
    # the gateway the offer was addressed to ("" = by resource: the router picks a live pool member);
    # a new session (healing) is addressed the same way, so a pooled tunnel heals through any member
    addressed_gateway: str = ""
    _server: asyncio.AbstractServer | None = None
    _ready: asyncio.Event | None = None
    _pending: dict[int, asyncio.Future[tuple[str | None, int | None]]] = field(default_factory=dict)
    _pumps: dict[int, ChannelPump] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _watch: asyncio.Task[None] | None = None

    async def bind(self) -> int:
        """Bind the local listener first, so a busy port fails before any signaling."""
        self._ready = asyncio.Event()
        self._server = await direct_stream.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def attach(self, session: Any) -> None:
        """The data plane is up: start serving connections over `session.peer`."""
        self.session = session
        peer: ClientPeer = session.peer
        peer.on_control(self._on_control)
        self.state = "up"
        assert self._ready is not None
        self._ready.set()
        self._watch = asyncio.ensure_future(self._watch_peer(peer))

    async def _watch_peer(self, peer: ClientPeer) -> None:
        await peer.lost.wait()
        if self.state == "up":
            self.reason = peer.lost_reason or "the gateway went away"
            if self.heal and not peer.ended_by_gateway:  # reset open ones; new ones wait for the next session
                self.state = "reconnecting"
                assert self._ready is not None
                self._ready.clear()
                await self._end_connections()
            else:
                self.state = "lost"
                await self._stop_serving()
            if self.on_lost is not None:
                self.on_lost(self)

    def _on_control(self, message: dict[str, Any]) -> None:
        stream_id = message.get("id")
        future = self._pending.get(stream_id) if isinstance(stream_id, int) else None
        if future is None or future.done():
            return
        if message["op"] == "opened":
            future.set_result((None, flow.parse_window(message.get("window"))))
        elif message["op"] == "refused":
            future.set_result((str(message.get("reason") or "refused by the target"), None))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None and self._ready is not None
        self._tasks.add(task)
        self.stats.connections_total += 1
        self.stats.connections_open += 1
        try:
            await self._ready.wait()
            if self.state != "up":
                return
            peer: ClientPeer = self.session.peer
            channel = peer.open_stream()
            future: asyncio.Future[tuple[str | None, int | None]] = asyncio.get_running_loop().create_future()
            self._pending[channel.id] = future
            # "window": this side grants credit (a gateway without flow control ignores it)
            extra = {"resource": self.stream_resource} if self.stream_resource else {}
            peer.send_control("open", id=channel.id, window=flow.DEFAULT_WINDOW, **extra)
            try:
                refusal, gateway_window = await asyncio.wait_for(future, OPEN_TIMEOUT_S)
            except asyncio.TimeoutError:
                refusal, gateway_window = "the gateway did not open the connection in time", None
            finally:
                self._pending.pop(channel.id, None)
            if refusal is not None:
                self.stats.refused += 1
                self.stats.last_error = refusal[:200]
                log.info("tunnel %s: connection refused: %s", self.id, refusal)
                channel.close()
                return
            pump = ChannelPump(channel, reader, writer, self.stats, send_limit=gateway_window)
            self._pumps[channel.id] = pump
            try:
                await pump.run()
            finally:
                self._pumps.pop(channel.id, None)
        except asyncio.CancelledError:
            # Only our own stop cancels this handler. End it normally: Python < 3.12 calls
            # task.exception() on a cancelled start_server handler and logs a bogus error.
            return
        except Exception as exc:  # one connection's failure never takes the tunnel down
            self.stats.last_error = f"{exc.__class__.__name__}: {exc}"[:200]
            log.debug("tunnel %s connection failed", self.id, exc_info=True)
        finally:
            self.stats.connections_open -= 1
            writer.close()
            self._tasks.discard(task)

    async def _stop_serving(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self._end_connections()

    async def _end_connections(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stop(self) -> None:
        """Close the listener and every connection; the peer is closed by the caller."""
        if self.state != "lost":
            self.state = "stopped"
        if self._watch is not None:
            self._watch.cancel()
        await self._stop_serving()

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "resource": self.resource, "gateway": self.gateway,
                "local_address": f"{self.host}:{self.port}", "host": self.host, "port": self.port,
                "state": self.state, "reason": self.reason,
                "connections": self.stats.connections_open, "connections_total": self.stats.connections_total,
                "bytes_out": self.stats.bytes_out, "bytes_in": self.stats.bytes_in,
                "refused": self.stats.refused, "last_error": self.stats.last_error,
                "age_s": round(time.time() - self.started, 1)}
