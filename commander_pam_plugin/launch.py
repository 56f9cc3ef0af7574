"""`pam launch`: the user's terminal joined to a gateway-held SSH session over the terminal channel.

The gateway starts the SSH connect when the offer arrives, in parallel with ICE, so the first
remote byte usually follows the data channel by a few ms. That byte is `ready_for_prompt`.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import queue
import re
import sys
import threading
import time
from collections import deque
from dataclasses import replace
from typing import Any, Callable, Iterator

from aiortc import RTCDataChannel

from . import flow, protocol
from .errors import PamError
from .launch_link import TerminalLink, settle
from .negotiation import ConnectOptions, RouterRefusal, Session
from .peer import HIGH_WATER, LOW_WATER, ClientPeer
from .progress import ProgressIndicator
from .runtime import ResourceRef, get_runtime
from .terminal import TerminalRunner, is_interactive, terminal_size
from .timing import ConnectTiming, format_table

log = logging.getLogger(__name__)
RESUME_LABEL = "pam-launch:resume"
ATTEMPT_TIMEOUT_S = 6.0  # one resume negotiation; a path still down fails it
ATTEMPT_STAGGER_S = 1.5  # a new attempt this often while the path is down ...
MAX_ATTEMPTS_IN_FLIGHT = 3  # ... with at most this many negotiating at once
HANDSHAKE_TIMEOUT_S = 10.0  # data channel up to the gateway's resumed/refused

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
    link = TerminalLink(runtime.loop, interactive)
    runtime.loop.call_soon(_quiet_lost_transport_errors)

    def first_output() -> None:
        progress.clear()
        cli.checkpoint("first_output")
        total.summary("ready_for_prompt")

    link.on_first_output = first_output
    try:
        ref = runtime.resolve(ctx.hook, args.resource)
        if ref.kind is not None and ref.kind != "ssh":  # unknown: the gateway refuses it in the same words
            raise PamError(f"{ref.name} is a {ref.kind} resource; pam launch opens ssh resources "
                           f"(use: pam tunnel start {ref.name})")
        timing.checkpoint("resource_resolved")
        # resumable: a current gateway gives this client a session id and secret (PROTOCOL.md 7);
        # stderr: without a PTY, remote stderr comes marked apart and goes to local stderr.
        request = FlowSessionRequest(mode="terminal", term=_terminal_type(), cols=cols, rows=rows,
                                     command=args.command, pty=interactive, resumable=True,
                                     stderr=not interactive)

        def on_peer(peer: ClientPeer) -> None:
            assert peer.terminal is not None
            link.use(TerminalFlow(peer.terminal), peer)

        from .commands import connect_options
        options = connect_options(runtime, args)
        session = runtime.connect(ctx.hook, ref, request, trickle=not args.no_trickle_ice, timing=timing,
                                  on_peer=on_peer, options=options)
    except BaseException:
        progress.clear()
        raise
    from .hookspecs import SessionEvent

    ctx.hook.pam_session_event(event=SessionEvent(kind="opened", command="pam launch", resource=ref.name,
                                                  session_id=session.conversation_id, reason=None))
    runner = TerminalRunner(link, stderr=stderr)
    runtime.loop.call_soon(link.start, runner)  # output that came before the runner existed, in order
    resumer = Resumer(ctx.hook, runtime, ref, request, link, session, options, total)
    resumer.begin(runner)
    try:
        status = runner.run()
    finally:
        progress.clear()
        resumer.stop()
    ctx.hook.pam_session_event(event=SessionEvent(kind="closed", command="pam launch", resource=ref.name,
                                                  session_id=session.conversation_id,
                                                  reason=f"exit status {status}"))
    if args.timing:  # at the end: printed after connecting it would land inside the remote terminal
        resumes = [event for resume in resumer.timings for event in resume.events]
        print(format_table(total.events + resumes), file=stderr, flush=True)
    return status


class Resumer:
    """Watches the attached peer and, when it is lost, re-establishes the session: a new offer
    through the router naming the held session, then its secret on the new data channel, retried
    with backoff until the grace period the gateway announced is over (PROTOCOL.md section 7)."""

    def __init__(self, hook: Any, runtime: Any, ref: Any, request: FlowSessionRequest, link: TerminalLink,
                 session: Session, options: ConnectOptions, total: ConnectTiming) -> None:
        self.hook, self.runtime, self.ref, self.request, self.link = hook, runtime, ref, request, link
        self.session, self.options, self.total = session, options, total
        self._stopped = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._runner: TerminalRunner | None = None
        self.timings: list[ConnectTiming] = []  # one per resume, from the loss being noticed
        self._outage = 0  # numbered, so a late attempt of an earlier outage never claims a later one
        self._claimed = 0  # the outage whose resume an attempt is presenting the secret for

    def begin(self, runner: TerminalRunner) -> None:
        self._runner = runner
        threading.Thread(target=self._watch, name="pam-launch-resume", daemon=True).start()

    def stop(self) -> None:
        """The runner ended (exit, ~., failure): close whichever session is current."""
        self._stopped.set()
        self._wake.set()
        with self._lock:
            session = self.session
        session.close()

    def _watch(self) -> None:
        assert self._runner is not None
        while not self._stopped.is_set():
            with self._lock:
                peer = self.session.peer
            self.runtime.loop.submit(peer.lost.wait()).add_done_callback(lambda _: self._wake.set())
            self._wake.wait()
            self._wake.clear()
            if self._stopped.is_set():
                return
            if not self._resume(peer.lost_reason):
                return

    def _resume(self, reason: str) -> bool:
        runner, link, ref = self._runner, self.link, self.ref
        assert runner is not None
        self.runtime.loop.run(_on_loop(link.detach), timeout=5)
        grant = link.grant
        with self._lock:
            ended_by_gateway = self.session.peer.ended_by_gateway
        # an older gateway, resume off for this resource, or an end the gateway decided (a limit,
        # `pam-gateway terminate`): final, never resumed
        if grant is None or grant.grace_s <= 0 or ended_by_gateway:
            runner.feed_error(f"connection to the gateway lost: {reason}")
            return False
        lost_at = time.monotonic()
        runner.feed_notice(f"connection to {ref.name} lost ({reason}); re-establishing... (~. gives up)")
        with self._lock:
            old = self.session
        old.close(notify=False, wait=False)
        timing = ConnectTiming(RESUME_LABEL, hook=self.hook)
        self.timings.append(timing)
        request = replace(self.request, resume=grant.session_id)
        outcomes: queue.Queue[tuple[str, str, Session | None]] = queue.Queue()
        self._outage += 1
        outage, in_flight, started, delays = self._outage, 0, 0, _backoff()
        next_start = time.monotonic()
        while not self._stopped.is_set():
            now = time.monotonic()
            left = grant.grace_s - (now - lost_at)
            if left <= 0:
                runner.feed_error(f"the session on {ref.name} could not be resumed within its "
                                  f"{grant.grace_s:g} s grace period; the gateway ends it then")
                return False
            if in_flight < MAX_ATTEMPTS_IN_FLIGHT and now >= next_start:
                # Attempts overlap: a path that comes back is found by the freshest one's ICE
                # checks (they retransmit ever more rarely), not only after the oldest gives up.
                started += 1
                timing.checkpoint(f"attempt_{started}_started")
                threading.Thread(target=lambda timeout: outcomes.put(self._attempt(request, outage, timeout)),
                                 args=(min(ATTEMPT_TIMEOUT_S, left),), name="pam-launch-resume-attempt",
                                 daemon=True).start()
                in_flight += 1
                next_start = now + ATTEMPT_STAGGER_S
            try:
                outcome, detail, session = outcomes.get(timeout=max(0.01, min(left, next_start - now)))
            except queue.Empty:
                continue
            in_flight -= 1
            if self._stopped.is_set():
                if session is not None:
                    session.close()
                return False
            if outcome == "resumed":
                assert session is not None
                with self._lock:
                    self.session = session
                timing.checkpoint("resumed")
                runner.feed_notice(f"connection to {ref.name} re-established after "
                                   f"{time.monotonic() - lost_at:.1f} s")
                from .hookspecs import SessionEvent

                self.hook.pam_session_event(event=SessionEvent(
                    kind="resumed", command="pam launch", resource=ref.name, session_id=session.conversation_id,
                    reason=f"after {time.monotonic() - lost_at:.1f} s: {reason}"))
                return True
            if outcome == "refused":
                runner.feed_error(f"the session on {ref.name} cannot be resumed: {detail}")
                return False
            log.debug("resume attempt failed: %s", detail)
            next_start = max(next_start, time.monotonic() + next(delays))  # failing fast (router refusing): back off
        return False

    def _attempt(self, request: FlowSessionRequest, outage: int, timeout_s: float) -> tuple[str, str, Session | None]:
        """One negotiation and handshake (own thread): ("resumed"|"refused"|"retry", reason, session).

        Of attempts that connect, the first claims the outage and presents the secret; the others close."""
        holder: dict[str, Any] = {}

        def on_peer(peer: ClientPeer) -> None:
            assert peer.terminal is not None
            holder["flow"] = TerminalFlow(peer.terminal)
            holder["handshake"] = self.link.offer_resume(holder["flow"], peer)

        options = replace(self.options, timeout_s=timeout_s)
        try:
            session = self.runtime.connect(self.hook, ResourceRef(self.ref.name, self.session.gateway), request,
                                           trickle=options.trickle, on_peer=on_peer, options=options)
        except RouterRefusal as exc:
            final = exc.http_status in (403, 404, 410)
            return ("refused" if final else "retry"), exc.message.removeprefix("router: "), None
        except PamError as exc:
            return "retry", exc.message, None
        with self._lock:
            claimed = self._claimed == outage or self._stopped.is_set()
            if not claimed:
                self._claimed = outage
        if claimed:  # another attempt of this outage got there first
            session.close(notify=False)
            return "retry", "another attempt resumed first", None
        timing = self.timings[-1]
        timing.checkpoint("connected")
        self.link.on_first_output = lambda: timing.summary("first_resumed_output")
        handshake = holder["handshake"]
        self.runtime.loop.call_soon(self.link.hello, holder["flow"])
        try:
            outcome, detail = handshake.result(timeout=HANDSHAKE_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            settle(handshake, ("retry", "the gateway did not answer the resume request"))
            outcome, detail = handshake.result()  # "resumed" if it came just now
        if outcome != "resumed":
            # Without the close action: a close would end the held session if the gateway had
            # attached it to this attempt; a lost peer only detaches it.
            with self._lock:
                self._claimed = 0
            session.close(notify=False)
            return outcome, detail, None
        return outcome, detail, session


def _quiet_lost_transport_errors() -> None:
    """A lost path makes SCTP retransmit tasks fail with ConnectionError ('not connected'), which
    asyncio reports as an ERROR with a traceback: inside a session that is about to be resumed it
    would land in the user's terminal. That one case goes to DEBUG; everything else as before."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        future = context.get("future")
        coro = future.get_coro() if isinstance(future, asyncio.Task) else None
        if isinstance(context.get("exception"), ConnectionError) and getattr(coro, "__name__", "") == "_transmit":
            log.debug("SCTP transmit on a lost path: %s", context["exception"])
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    if not getattr(previous, "pam_quiet_lost_transport", False):  # once per loop
        handler.pam_quiet_lost_transport = True  # type: ignore[attr-defined]
        loop.set_exception_handler(handler)


async def _on_loop(function: Callable[[], None]) -> None:
    function()


def _backoff() -> Iterator[float]:
    """Waits between failed resume attempts: doubling from 0.2 s to 2 s (each attempt is bounded too)."""
    delay = 0.2
    while True:
        yield delay
        delay = min(delay * 2, 2.0)
