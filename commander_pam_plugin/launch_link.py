"""The client's half of a resumable `pam launch` terminal: which channel carries it now, and the
byte offsets that let a new channel continue exactly where the lost one stopped.

Output is counted as it arrives (the gateway replays from that count); input is kept, numbered,
until the gateway acknowledges having written it, and whatever it has not written is sent again
on the new channel (docs/PROTOCOL.md section 7). Everything here runs on the plugin's loop, except
the RemoteEnd methods the terminal runner calls from the main thread.
"""
from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass
from typing import Any, Callable

from . import protocol
from .loop import BackgroundLoop
from .terminal import TerminalRunner, terminal_size

OUTPUT_ACK_BYTES = 32 * 1024  # acknowledge output at once past this much, else after OUTPUT_ACK_DELAY_S
OUTPUT_ACK_DELAY_S = 0.25
TYPED_WHILE_AWAY = ("typing is not sent while the connection is being re-established "
                    "(what you type now is dropped; ~. gives up)")


@dataclass
class ResumeGrant:
    """What the gateway gave this client over the data channel: the only copy of the secret."""

    session_id: str
    secret: str
    grace_s: float


class InputLog:
    """Input numbered from 0; kept from `base` until the gateway acknowledges writing it."""

    def __init__(self) -> None:
        self.base = 0
        self.data = bytearray()
        self.eof = False

    @property
    def end(self) -> int:
        return self.base + len(self.data)

    def append(self, data: bytes) -> None:
        self.data.extend(data)

    def acknowledge(self, written: int) -> None:
        drop = min(max(0, written - self.base), len(self.data))
        del self.data[:drop]
        self.base += drop

    def since(self, written: int) -> bytes:
        """What the gateway has not written yet (written >= base: it never acknowledges more)."""
        return bytes(self.data[max(0, written - self.base):])


class TerminalLink:
    """The terminal channel of the moment (None while re-establishing) and the offsets across them."""

    def __init__(self, loop: BackgroundLoop, interactive: bool) -> None:
        self.loop = loop
        self.interactive = interactive
        self.grant: ResumeGrant | None = None
        self.output_received = 0
        self._output_acked = 0
        self._ack_timer: Any = None
        self.input = InputLog()
        self.flow: Any = None  # TerminalFlow of the attached channel
        self.peer: Any = None
        self.runner: TerminalRunner | None = None
        self._pending: list[tuple[str, Any]] = []  # output that came before the runner existed
        self._stderr_left = 0  # bytes of the coming output that are remote stderr
        self._size: tuple[int, int] | None = None
        self.on_first_output: Callable[[], None] | None = None
        self._typed_away_noticed = False
        self.away = False
        self._on_writable: Callable[[], None] | None = None
        self._lock = threading.Lock()

    # --- channels ---------------------------------------------------------------------------

    def use(self, flow: Any, peer: Any) -> None:
        """The first channel: attached from the start."""
        self.flow, self.peer = flow, peer
        flow.on_writable = self._on_writable
        flow.channel.on("message", lambda message: self._on_message(flow, message))

    def offer_resume(self, flow: Any, peer: Any) -> concurrent.futures.Future[tuple[str, str]]:
        """A new channel for a held session (before negotiation): the future gets ("resumed", "")
        or ("refused"|"retry", reason) once `hello` has asked."""
        handshake: concurrent.futures.Future[tuple[str, str]] = concurrent.futures.Future()
        flow.channel.on("message", lambda message: self._on_message(flow, message, (peer, handshake)))
        flow.channel.on("close", lambda: settle(handshake, ("retry", "the new terminal channel closed")))
        return handshake

    def hello(self, flow: Any) -> None:
        """The resume request, first on the new channel; sent only once the connect has succeeded,
        so the gateway never attaches the session to an attempt this client has given up on."""
        grant = self.grant
        assert grant is not None

        def send() -> None:  # after TerminalFlow's own open handler: its credit goes first
            flow.channel.send(protocol.control_message("resume", id=grant.session_id, secret=grant.secret,
                                                       output=self.output_received))

        if flow.channel.readyState == "open":
            send()
        else:
            flow.channel.once("open", send)

    def detach(self) -> None:
        """The peer is gone: nothing is sent until a resume attaches a new channel."""
        with self._lock:
            self.flow, self.peer, self.away = None, None, True
            self._typed_away_noticed = False
        self._stderr_left = 0  # a marker's bytes in flight are replayed with a new marker
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None

    def _attach(self, flow: Any, peer: Any, written: int, eof: bool) -> None:
        """Resumed: input the gateway has not written goes again, then the window size."""
        self.input.acknowledge(written)
        with self._lock:
            self.flow, self.peer, self.away = flow, peer, False
        again = self.input.since(written)
        if again:
            flow.reserve(len(again))
            flow.send(again)
        if self.input.eof and not eof:
            flow.send(protocol.control_message("eof"))
        size = self._size
        if self.interactive and self.runner is not None:
            size = terminal_size(0)
        if size is not None:
            peer.send_control("resize", cols=size[0], rows=size[1])
        flow.on_writable = self._on_writable
        if self._on_writable is not None:
            self._on_writable()  # a pipe reader stopped while away: read on

    # --- arriving messages --------------------------------------------------------------------

    def _on_message(self, flow: Any, message: Any, resuming: tuple[Any, concurrent.futures.Future[Any]] | None = None
                    ) -> None:
        if flow.take(message):
            return
        if isinstance(message, bytes):
            if flow is not self.flow:
                return  # a lost channel's last bytes: the new one replays them
            self._output(message)
            return
        try:
            op = protocol.parse_control_message(message)
        except protocol.ProtocolError:
            return
        kind = op["op"]
        if flow is not self.flow:
            if resuming is not None:
                self._on_handshake(flow, *resuming, op)
            return
        if kind == "session" and isinstance(op.get("id"), str) and isinstance(op.get("secret"), str):
            grace = op.get("grace")
            self.grant = ResumeGrant(op["id"], op["secret"], float(grace) if isinstance(grace, (int, float)) else 0.0)
        elif kind == "ack":
            written = op.get("input")
            if isinstance(written, int) and not isinstance(written, bool) and written <= self.input.end:
                self.input.acknowledge(written)
        elif kind == "stderr":
            size = op.get("size")
            if isinstance(size, int) and not isinstance(size, bool) and size > 0:
                self._stderr_left = size
        else:
            self._deliver("control", op)

    def _on_handshake(self, flow: Any, peer: Any, handshake: concurrent.futures.Future[Any],
                      op: dict[str, Any]) -> None:
        if op["op"] == "resumed":
            written, output = op.get("input"), op.get("output")
            if (not isinstance(written, int) or isinstance(written, bool) or not self.input.base <= written
                    <= self.input.end or output != self.output_received):
                settle(handshake, ("refused", "the gateway's resume offsets do not match this client's"))
                return
            if settle(handshake, ("resumed", "")):  # else the resumer gave up on this attempt
                self._attach(flow, peer, written, op.get("eof") is True)
        elif op["op"] == "error":
            reason = str(op.get("reason") or "resume refused")[:300]
            settle(handshake, ("retry" if op.get("retry") is True else "refused", reason))

    def _output(self, data: bytes) -> None:
        self.output_received += len(data)
        if self.on_first_output is not None:
            first, self.on_first_output = self.on_first_output, None
            first()
        if self._stderr_left:
            cut = min(self._stderr_left, len(data))
            self._stderr_left -= cut
            self._deliver("stderr", data[:cut])
            data = data[cut:]
        if data:
            self._deliver("stdout", data)
        self._acknowledge_output()

    def _acknowledge_output(self) -> None:
        if self.grant is None:
            return
        if self.output_received - self._output_acked >= OUTPUT_ACK_BYTES:
            self._send_output_ack()
        elif self._ack_timer is None:
            self._ack_timer = self.loop.loop.call_later(OUTPUT_ACK_DELAY_S, self._send_output_ack)

    def _send_output_ack(self) -> None:
        self._ack_timer = None
        flow = self.flow
        if flow is not None and self.output_received != self._output_acked and flow.channel.readyState == "open":
            self._output_acked = self.output_received
            flow.send(protocol.control_message("ack", output=self.output_received))

    def _deliver(self, kind: str, item: Any) -> None:
        runner = self.runner
        if runner is None:
            self._pending.append((kind, item))
            return
        if kind == "stdout":
            runner.feed_output(item)
        elif kind == "stderr":
            runner.feed_stderr(item)
        elif item["op"] == "exit":
            status = item.get("status")
            runner.feed_exit(status if isinstance(status, int) and 0 <= status <= 255 else 255)
        elif item["op"] == "error":
            runner.feed_error(str(item.get("reason") or "the remote session failed")[:300])

    def start(self, runner: TerminalRunner) -> None:
        """The runner exists: hand it what came before (on the loop, in order)."""
        self.runner = runner
        pending, self._pending = self._pending, []
        for kind, item in pending:
            self._deliver(kind, item)

    # --- the RemoteEnd the runner uses (main thread) ------------------------------------------

    def send(self, data: bytes) -> None:
        with self._lock:
            flow, away = self.flow, self.away
            if away and self.interactive:  # typed blind: dropped, said once per outage
                notice, self._typed_away_noticed = not self._typed_away_noticed, True
                if notice and self.runner is not None:
                    self.runner.feed_notice(TYPED_WHILE_AWAY)
                return
        if flow is not None:
            flow.reserve(len(data))
        self.loop.call_soon(self._input, data)

    def _input(self, data: bytes) -> None:
        self.input.append(data)
        flow = self.flow
        if flow is not None:
            flow.send(data)
        # else (pipe mode, read just before the loss): kept, and sent on the next channel

    def writable(self) -> bool:
        with self._lock:
            flow, away = self.flow, self.away
        if away:
            return self.interactive  # a terminal keeps being read (for ~.), a pipe waits
        return flow is None or flow.writable.is_set()

    def on_writable(self, callback: Callable[[], None]) -> None:
        self._on_writable = callback
        self.loop.call_soon(self._wire_writable)

    def _wire_writable(self) -> None:
        if self.flow is not None:
            self.flow.on_writable = self._on_writable

    def delivered(self, size: int) -> None:
        flow = self.flow
        if flow is not None:
            self.loop.call_soon(flow.delivered, size)

    def send_eof(self) -> None:
        def eof() -> None:
            self.input.eof = True
            if self.flow is not None:
                self.flow.send(protocol.control_message("eof"))
        self.loop.call_soon(eof)

    def resize(self, cols: int, rows: int) -> None:
        def resize() -> None:
            self._size = (cols, rows)
            if self.peer is not None:
                self.peer.send_control("resize", cols=cols, rows=rows)
        self.loop.call_soon(resize)

    def close(self) -> None:
        def forget() -> None:
            if self.flow is not None:
                self.flow.on_writable = None
        self.loop.call_soon(forget)


def settle(future: concurrent.futures.Future[Any], value: Any) -> bool:
    """Set the outcome unless one is set already (from either thread); True if this call set it."""
    try:
        future.set_result(value)
    except concurrent.futures.InvalidStateError:
        return False
    return True
