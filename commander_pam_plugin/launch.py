"""`pam launch`: the user's terminal joined to a gateway-held SSH session over the terminal channel.

The gateway starts the SSH connect when the offer arrives, in parallel with ICE, so the first
remote byte usually follows the data channel by a few ms. That byte is `ready_for_prompt`.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import threading
from collections import deque
from typing import Any, Callable

from aiortc import RTCDataChannel

from . import flow, protocol
from .errors import PamError
from .loop import BackgroundLoop
from .peer import HIGH_WATER, LOW_WATER, ClientPeer
from .progress import ProgressIndicator
from .runtime import get_runtime
from .terminal import TerminalRunner, is_interactive, terminal_size
from .timing import ConnectTiming, format_table

_TERM_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
PHASE_NAMES = {
    "resource_resolved": "creating the peer",
    "peer_created": "gathering local candidates",
    "offer_created": "sending the offer",
    "offer_acked": "waiting for the answer",
    "answer_received": "connecting (ICE)",
    "ice_connected": "securing the channel (DTLS/SCTP)",
    "data_channel_open": "waiting for the remote prompt",
}


class TerminalFlow:
    """Flow control of the terminal channel, both ways (docs/PROTOCOL.md section 5). Loop only.

    Input waits in a local outbox until the gateway's credit (once it granted any) and the
    channel's buffer allow it; the runner stops reading stdin while that outbox is full.
    Output counts against this side's window, and credit goes back as stdout takes it.
    """

    def __init__(self, channel: RTCDataChannel) -> None:
        self.channel = channel
        self.credit = flow.SendCredit(None)
        self.window = flow.ReceiveWindow(flow.DEFAULT_WINDOW)
        self.queued = 0  # input bytes handed over and not yet sent (any thread, under _lock)
        self._lock = threading.Lock()
        self.writable = threading.Event()
        self.writable.set()
        self.on_writable: Callable[[], None] | None = None
        self._outbox: deque[bytes | str] = deque()
        self._announced = False
        channel.bufferedAmountLowThreshold = LOW_WATER
        channel.on("open", self._announce)
        channel.on("bufferedamountlow", self._pump)
        channel.on("close", self._on_close)
        if channel.readyState == "open":
            self._announce()

    def _announce(self) -> None:
        if not self._announced and self.channel.readyState == "open":
            self._announced = True
            self.channel.send(flow.credit_message(self.window.granted))
            self._pump()

    def take(self, message: Any) -> bool:
        """Account for one arriving message; True if it was flow control (not for the runner)."""
        if isinstance(message, bytes):
            self.window.receive(len(message))
            return False
        if isinstance(message, str) and '"credit"' in message:
            try:
                op = protocol.parse_control_message(message)
            except (protocol.ProtocolError, ValueError):
                return False
            limit = flow.parse_credit(op) if op["op"] == flow.CREDIT_OP else None
            if limit is not None:
                self.credit.grant(limit)
                self._pump()
                return True
        return False

    def delivered(self, size: int) -> None:
        limit = self.window.deliver(size)
        if limit is not None and self.channel.readyState == "open":
            self.channel.send(flow.credit_message(limit))

    def reserve(self, size: int) -> None:
        """Called by the sending thread before send(): the bytes count as queued from now on."""
        with self._lock:
            self.queued += size
            if self.queued >= HIGH_WATER:
                self.writable.clear()

    def send(self, item: bytes | str) -> None:
        """Queue input (bytes reserved first) or an in-band message, in order; send what credit allows."""
        self._outbox.append(item)
        self._pump()

    def _pump(self) -> None:
        while self._outbox and self.channel.readyState == "open" and self.channel.bufferedAmount <= HIGH_WATER:
            item = self._outbox[0]
            if isinstance(item, bytes):
                allowance = self.credit.allowance
                if allowance == 0:
                    break
                if allowance is not None and len(item) > allowance:
                    item, self._outbox[0] = item[:allowance], item[allowance:]
                else:
                    self._outbox.popleft()
                self.credit.spend(len(item))
                with self._lock:
                    self.queued -= len(item)
            else:
                self._outbox.popleft()
            self.channel.send(item)
        self._update_writable()

    def _update_writable(self) -> None:
        with self._lock:
            ready = self.queued < HIGH_WATER or self.channel.readyState != "open"
            wake = ready and not self.writable.is_set()
            if ready:
                self.writable.set()
            else:
                self.writable.clear()
        if wake and self.on_writable is not None:
            self.on_writable()

    def _on_close(self) -> None:
        self._outbox.clear()
        with self._lock:
            self.queued = 0
        self._update_writable()


class FlowSessionRequest(protocol.SessionRequest):
    """A terminal request that announces this client's terminal window (flow control, PROTOCOL.md
    section 5), so the gateway is bounded from its first byte; older gateways ignore the field."""

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "window": flow.DEFAULT_WINDOW}


class ChannelRemote:
    """RemoteEnd over the terminal data channel; called from the main thread, acts on the loop."""

    def __init__(self, loop: BackgroundLoop, peer: ClientPeer, flow_control: TerminalFlow) -> None:
        self._loop = loop
        self._peer = peer
        self._flow = flow_control

    def send(self, data: bytes) -> None:
        self._flow.reserve(len(data))  # counted at once, so the runner stops reading stdin in time
        self._loop.call_soon(self._flow.send, data)

    def writable(self) -> bool:
        return self._flow.writable.is_set()

    def on_writable(self, callback: Callable[[], None]) -> None:
        self._flow.on_writable = callback

    def delivered(self, size: int) -> None:
        self._loop.call_soon(self._flow.delivered, size)

    def send_eof(self) -> None:
        self._loop.call_soon(self._flow.send, protocol.control_message("eof"))

    def resize(self, cols: int, rows: int) -> None:
        self._loop.call_soon(lambda: self._peer.send_control("resize", cols=cols, rows=rows))

    def close(self) -> None:
        self._flow.on_writable = None


class _ProgressTiming:
    """Timing checkpoints that also move the progress line to the next phase."""

    def __init__(self, timing: ConnectTiming, progress: ProgressIndicator) -> None:
        self._timing = timing
        self._progress = progress

    def checkpoint(self, phase: str) -> Any:
        event = self._timing.checkpoint(phase)
        if phase in PHASE_NAMES:
            self._progress.phase(PHASE_NAMES[phase])
        return event


def _terminal_type() -> str:
    term = os.environ.get("TERM", "")
    return term if _TERM_OK.match(term) and term != "dumb" else "xterm-256color"


def run_launch(ctx: Any, args: argparse.Namespace) -> int:
    runtime = get_runtime()
    stderr = getattr(ctx, "stderr", None) or sys.stderr
    # May start the embedded default (it announces itself): before the progress line, and not
    # counted as connect time.
    runtime.router()
    total = ConnectTiming("pam-launch:total", hook=ctx.hook)
    webrtc = total.child("pam-launch:webrtc-tunnel")
    cli = total.child("pam-launch:cli_session")
    progress = ProgressIndicator(stderr)
    progress.phase("resolving the resource")
    timing = _ProgressTiming(webrtc, progress)
    interactive = is_interactive(sys.stdin.fileno())
    cols, rows = terminal_size(sys.stdout.fileno() if os.isatty(sys.stdout.fileno()) else sys.stdin.fileno())
    try:
        ref = runtime.resolve(ctx.hook, args.resource)
        if ref.kind is not None and ref.kind != "ssh":  # unknown: the gateway refuses it in the same words
            raise PamError(f"{ref.name} is a {ref.kind} resource; pam launch opens ssh resources "
                           f"(use: pam tunnel start {ref.name})")
        timing.checkpoint("resource_resolved")
        request = FlowSessionRequest(mode="terminal", term=_terminal_type(), cols=cols, rows=rows,
                                     command=args.command, pty=interactive)
        holder: dict[str, Any] = {}

        def on_peer(peer: ClientPeer) -> None:
            holder["flush"] = _attach(peer, holder, total, cli, progress)

        from .commands import connect_options
        session = runtime.connect(ctx.hook, ref, request, trickle=not args.no_trickle_ice, timing=timing,
                                  on_peer=on_peer, options=connect_options(runtime, args))
    except BaseException:
        progress.clear()
        raise
    from .hookspecs import SessionEvent

    ctx.hook.pam_session_event(event=SessionEvent(kind="opened", command="pam launch", resource=ref.name,
                                                  session_id=session.conversation_id, reason=None))
    runner = TerminalRunner(ChannelRemote(runtime.loop, session.peer, holder["flow"]), stderr=stderr)
    holder["runner"] = runner
    runtime.loop.call_soon(holder["flush"])  # output that came before the runner existed
    runtime.loop.submit(_watch_loss(session.peer, runner))
    try:
        status = runner.run()
    finally:
        progress.clear()
        session.close()
    ctx.hook.pam_session_event(event=SessionEvent(kind="closed", command="pam launch", resource=ref.name,
                                                  session_id=session.conversation_id,
                                                  reason=f"exit status {status}"))
    if args.timing:
        print(format_table(total.events), file=stderr, flush=True)
    return status


def _attach(peer: ClientPeer, holder: dict[str, Any], total: ConnectTiming, cli: ConnectTiming,
            progress: ProgressIndicator) -> Any:
    """Listen on the terminal channel before any byte can arrive (called right after the peer exists).

    Returns a flush function to call on the loop once the runner exists. Runs on the loop thread.
    """
    pending: list[Any] = []
    first = threading.Event()
    assert peer.terminal is not None
    flow_control = holder["flow"] = TerminalFlow(peer.terminal)

    def deliver(item: Any) -> None:
        runner = holder.get("runner")
        if runner is None:  # output before the runner exists: keep it, in order
            if item is not None:
                pending.append(item)
            return
        while pending:
            _feed(runner, pending.pop(0))
        _feed(runner, item)

    def on_message(message: Any) -> None:
        if flow_control.take(message):
            return
        if isinstance(message, bytes) and not first.is_set():
            first.set()
            progress.clear()
            cli.checkpoint("first_output")
            total.summary("ready_for_prompt")
        deliver(message)

    assert peer.terminal is not None
    peer.terminal.on("message", on_message)
    return lambda: deliver(None)


def _feed(runner: TerminalRunner, message: Any) -> None:
    if message is None:
        return
    if isinstance(message, bytes):
        runner.feed_output(message)
        return
    try:
        op = protocol.parse_control_message(message)
    except protocol.ProtocolError:
        return
    if op["op"] == "exit":
        status = op.get("status")
        runner.feed_exit(status if isinstance(status, int) and 0 <= status <= 255 else 255)
    elif op["op"] == "error":
        runner.feed_error(str(op.get("reason") or "the remote session failed")[:300])


async def _watch_loss(peer: ClientPeer, runner: TerminalRunner) -> None:
    await peer.lost.wait()
    runner.feed_error(f"connection to the gateway lost: {peer.lost_reason}")
