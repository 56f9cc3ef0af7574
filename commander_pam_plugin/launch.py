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
from typing import Any

from . import protocol
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


class ChannelRemote:
    """RemoteEnd over the terminal data channel; called from the main thread, acts on the loop."""

    def __init__(self, loop: BackgroundLoop, peer: ClientPeer) -> None:
        self._loop = loop
        self._peer = peer
        self._writable = threading.Event()
        self._writable.set()
        channel = peer.terminal
        assert channel is not None
        self._channel = channel
        channel.bufferedAmountLowThreshold = LOW_WATER
        channel.on("bufferedamountlow", self._writable.set)
        channel.on("close", self._writable.set)

    def send(self, data: bytes) -> None:
        self._writable.wait(30)
        self._loop.call_soon(self._send_now, data)

    def _send_now(self, data: bytes | str) -> None:
        if self._channel.readyState != "open":
            return
        self._channel.send(data)
        if self._channel.bufferedAmount > HIGH_WATER:
            self._writable.clear()

    def send_eof(self) -> None:
        self._loop.call_soon(self._send_now, protocol.control_message("eof"))

    def resize(self, cols: int, rows: int) -> None:
        self._loop.call_soon(lambda: self._peer.send_control("resize", cols=cols, rows=rows))

    def close(self) -> None:
        self._writable.set()


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
        request = protocol.SessionRequest(mode="terminal", term=_terminal_type(), cols=cols, rows=rows,
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
    runner = TerminalRunner(ChannelRemote(runtime.loop, session.peer), stderr=stderr)
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
