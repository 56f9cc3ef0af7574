"""What sits behind a stream channel: a TCP connection (tunnel) or an SSH session (terminal).

Both pump bytes between one data channel and the target, with the protocol's flow control:
send only within the client's credit, stop reading the target while the channel holds more
than 1 MiB unsent (resume at 256 KiB), send at most 16 KiB per message, write to the target
with drain and grant credit back as it drains. Text messages on the
channel are in-band control, ordered with the bytes (eof, exit, error).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

import asyncssh
from aiortc import RTCDataChannel

from .. import direct_stream, sctp_tuning
from ..flow import CREDIT_OP, reset_connection, DEFAULT_WINDOW, BufferBudget, ReceiveWindow, SendCredit, credit_message, parse_credit
from ..loop import half_close
from ..protocol import ProtocolError, SessionRequest, control_message, parse_control_message
from .config import Resource
from .recording import AsciicastRecorder
from . import ssh_window

log = logging.getLogger(__name__)

FLOW_HIGH = 1024 * 1024
FLOW_LOW = 256 * 1024
CHUNK = 16 * 1024
READ_SIZE = 64 * 1024
TCP_CONNECT_TIMEOUT_S = 10.0
SSH_CONNECT_TIMEOUT_S = 15.0
# What the SSH server may send before the gateway reads it: one flow-control window, so a slow
# client holds the gateway at about two windows per terminal (asyncssh's default is 2 MiB).
SSH_WINDOW = DEFAULT_WINDOW
ssh_window.apply()  # so that window is a bound while the reader is paused (ssh_window.py)


class ChannelClosed(Exception):
    """The client closed the stream channel; the target side is torn down quietly."""


class ChannelPipe:
    """One stream channel seen as an ordered inbox and a back-pressured outbox.

    Flow control both ways (docs/PROTOCOL.md section 5): sends wait for the client's credit
    (once it has granted any) and for `bufferedAmount` to fall; received bytes count against
    this stream's window and bound (and the session's budget), and credit goes back to the
    client as the target takes them (`delivered`). Credit messages are handled here, at
    arrival, so a target that does not read never delays credit for the other direction.

    `send_now` lets the owner send target bytes from the socket callback (direct_stream) when
    credit and buffer room allow and send() holds nothing.
    """

    def __init__(self, channel: RTCDataChannel, *, send_limit: int | None = None,
                 window: int = DEFAULT_WINDOW, bound: int | None = None,
                 budget: BufferBudget | None = None, announce: bool = False) -> None:
        self.channel = channel
        self.credit = SendCredit(send_limit)
        self.window = ReceiveWindow(window, bound, budget)
        self.failure = ""
        # Credit goes only to a client that announced a window: an older one sees the old protocol.
        self._grants = send_limit is not None
        self._announce = announce  # terminal: no open/opened, so the first window goes in-band
        self._inbox: asyncio.Queue[bytes | dict[str, Any] | None] = asyncio.Queue()
        self.direct = sctp_tuning.is_tuned(channel)
        self.chunk = CHUNK  # largest message sent
        self._sending = False  # send() holds bytes it has not sent yet: send_now must not overtake
        self.direct_sends = 0  # sends that skipped a task (tests, benchmarks)
        self._drained = asyncio.Event()
        self._opened = asyncio.Event()
        self.closed = asyncio.Event()
        channel.bufferedAmountLowThreshold = FLOW_LOW
        channel.on("message", self._on_message)
        channel.on("bufferedamountlow", self._drained.set)
        channel.on("open", self._on_open)
        channel.on("close", self._on_close)
        if channel.readyState == "open":
            self._on_open()

    def _on_open(self) -> None:
        if self._announce and self._grants and not self._opened.is_set() and self.is_open:
            self.channel.send(credit_message(self.window.granted))
        self._opened.set()

    def _on_message(self, message: bytes | str) -> None:
        if self.failure:
            return
        if isinstance(message, bytes):
            reason = self.window.receive(len(message))
            if reason is not None:
                log.warning("stream %s cut: %s", self.channel.id, reason)
                self.fail(reason)
                return
            self._inbox.put_nowait(message)
            return
        try:
            parsed = parse_control_message(message)
        except (ProtocolError, ValueError) as exc:
            log.debug("ignoring in-band message on channel %s: %s", self.channel.id,
                      getattr(exc, "message", exc.__class__.__name__))
            return
        if parsed["op"] == CREDIT_OP:
            limit = parse_credit(parsed)
            if limit is not None:
                self.credit.grant(limit)
            return
        self._inbox.put_nowait(parsed)

    def _on_close(self) -> None:
        self.closed.set()
        self._inbox.put_nowait(None)
        self.credit.close()
        self.window.release()
        self._drained.set()
        self._opened.set()

    @property
    def is_open(self) -> bool:
        return self.channel.readyState == "open"

    async def wait_open(self) -> None:
        await self._opened.wait()
        if not self.is_open:
            raise ChannelClosed()

    async def receive(self) -> bytes | dict[str, Any]:
        """Next payload (bytes) or in-band control message (dict); ChannelClosed when gone.

        Call `delivered(len(payload))` once the payload is out of this process."""
        item = await self._inbox.get()
        if item is None:
            self._inbox.put_nowait(None)  # stay closed for any later reader
            raise ChannelClosed()
        return item

    def delivered(self, size: int) -> None:
        """`size` received bytes reached the target: grant the client that much more credit."""
        limit = self.window.deliver(size)
        if limit is not None and self._grants and self.is_open:
            self.channel.send(credit_message(limit))

    def send_now(self, data: bytes) -> bool:
        """Send all of `data` now if credit and buffer room allow and send() holds nothing; else False."""
        if self._sending or not self.is_open or self.channel.bufferedAmount > FLOW_HIGH:
            return False
        allowance = self.credit.allowance
        if allowance is not None and allowance < len(data):
            return False
        chunk = self.chunk
        for position in range(0, len(data), chunk):
            self.channel.send(data[position:position + chunk])
        self.credit.spend(len(data))
        self.direct_sends += 1
        return True

    async def send(self, data: bytes) -> None:
        """Send in chunks within the client's credit, then wait while over the high-water mark."""
        self._sending = True
        try:
            await self._send(data)
        finally:
            self._sending = False

    async def _send(self, data: bytes) -> None:
        position = 0
        while position < len(data):
            allowance = await self.credit.wait()
            if not self.is_open:
                raise ChannelClosed()
            size = self.chunk if allowance is None else min(self.chunk, allowance)
            piece = data[position:position + size]
            self.channel.send(piece)
            self.credit.spend(len(piece))
            position += len(piece)
            while self.is_open and self.channel.bufferedAmount > FLOW_HIGH:
                self._drained.clear()
                await self._drained.wait()
        if not self.is_open:
            raise ChannelClosed()

    def control(self, op: str, **fields: Any) -> None:
        if self.is_open:
            self.channel.send(control_message(op, **fields))

    def fail(self, reason: str) -> None:
        """In-band error, then close: the client learns why the stream ended."""
        self.failure = self.failure or reason
        self.control("error", reason=reason)
        self.close()

    def close(self) -> None:
        if self.channel.readyState not in ("closing", "closed"):
            self.channel.close()


async def _run_both(first: Awaitable[Any], second: Awaitable[Any]) -> None:
    """Run two pumps to completion; the first failure cancels the other and is raised."""
    tasks = [asyncio.ensure_future(first), asyncio.ensure_future(second)]
    try:
        await asyncio.gather(*tasks)
    finally:
        await _cancel(tasks)


async def _until(main: Awaitable[Any], helper: Awaitable[Any]) -> Any:
    """Run `main` to completion with `helper` alongside; a helper failure aborts `main`."""
    main_task, helper_task = asyncio.ensure_future(main), asyncio.ensure_future(helper)
    try:
        done, _ = await asyncio.wait({main_task, helper_task}, return_when=asyncio.FIRST_COMPLETED)
        if main_task not in done:
            helper_task.result()
        return await main_task
    finally:
        await _cancel([main_task, helper_task])


async def _cancel(tasks: list[asyncio.Future[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class TcpStream:
    """One tunnel connection: channel N <-> TCP host:port, with TCP half-close mapped to eof."""

    def __init__(self, pipe: ChannelPipe, host: str, port: int) -> None:
        self.pipe, self.host, self.port = pipe, host, port
        self._writer: asyncio.StreamWriter | None = None
        self._reader: direct_stream.DirectReader | None = None

    async def connect(self) -> None:
        """Raise OSError/TimeoutError if the target does not accept within the timeout."""
        self._reader, self._writer = await asyncio.wait_for(
            direct_stream.open_connection(self.host, self.port), TCP_CONNECT_TIMEOUT_S)
        if self.pipe.direct:  # a tuned peer: bytes skip this stream's tasks where nothing waits
            self._reader.sink = self.pipe.send_now
            # Payloads to the target still go through _to_target: written from the channel's
            # callback, a write into a target that just reset failed with EPIPE before its reset
            # was read, so the stream's reason said BrokenPipeError (or nothing) instead of the
            # reset (tests/test_reliability_faults.py, test_dataplane_limits.py).

    async def run(self) -> None:
        """Pump both ways until both sides are done, the client goes away, or an error.

        A normal end (eof both ways) closes the target connection with a FIN; any other end
        (client gone, stream cut, failure) resets it, so the target cannot take a cut stream
        for a finished one."""
        normal = False
        try:
            await _run_both(self._to_target(), self._from_target())
            normal = True
        except ChannelClosed:
            pass
        except (OSError, asyncio.IncompleteReadError) as exc:
            self.pipe.fail(f"target connection failed ({exc.__class__.__name__})")
        except Exception as exc:  # never end a stream without a reason
            log.warning("stream %s failed", self.pipe.channel.id, exc_info=True)
            self.pipe.fail(f"the gateway failed on this stream ({exc.__class__.__name__})")
        finally:
            self.pipe.close()
            self._close_socket(reset=not normal)

    async def _to_target(self) -> None:
        assert self._writer is not None
        while True:
            item = await self.pipe.receive()
            if isinstance(item, bytes):
                self._writer.write(item)
                await self._drain()
                self.pipe.delivered(len(item))
            elif item.get("op") == "eof":
                half_close(self._writer)
                return

    async def _drain(self) -> None:
        """drain(), but a stream closed meanwhile (cut, or the client gone) stops the wait: a target
        that never reads must not hold its connection and quota slot forever."""
        assert self._writer is not None
        if self._writer.transport.get_write_buffer_size() <= READ_SIZE:
            await self._writer.drain()  # not paused: returns at once
            return
        drain = asyncio.ensure_future(self._writer.drain())
        closed = asyncio.ensure_future(self.pipe.closed.wait())
        try:
            await asyncio.wait({drain, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _cancel([closed] + ([] if drain.done() else [drain]))
            if drain.done() and not drain.cancelled():
                drain.exception()  # retrieved: a reset target while we are cancelled is no ERROR line
        if drain.cancelled():
            raise ChannelClosed()
        drain.result()

    async def _from_target(self) -> None:
        assert self._reader is not None
        while True:
            data = await self._reader.read(READ_SIZE)
            if not data:
                self.pipe.control("eof")
                return
            await self.pipe.send(data)

    def _close_socket(self, reset: bool = False) -> None:
        if self._writer is not None:
            if reset:
                reset_connection(self._writer)
            else:
                self._writer.close()
            self._writer = None


def ssh_failure_reason(exc: BaseException, resource: Resource) -> str:
    """A one-line, credential-free reason a user can act on."""
    name = resource.name
    if isinstance(exc, asyncssh.PermissionDenied):
        return f"ssh: authentication as {resource.username} on {name} failed"
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return f"ssh: the host key of {name} is not trusted (check known_hosts)"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"ssh: timed out connecting to {name}"
    if isinstance(exc, (asyncssh.DisconnectError, asyncssh.ChannelOpenError)):
        return f"ssh: {name}: {exc.reason}"
    if isinstance(exc, OSError):
        return f"ssh: cannot connect to {name} ({exc.strerror or exc.__class__.__name__})"
    return f"ssh: session on {name} failed ({exc.__class__.__name__})"


def _exit_status(process: asyncssh.SSHClientProcess) -> int:
    code = process.returncode
    if code is None:
        return 255
    return code if code >= 0 else 128 - code


class SshTerminal:
    """An SSH session to a resource with credentials the client never sees.

    `start()` begins connect + auth + process at once, so it overlaps ICE; `run(pipe)` then
    joins it to the terminal channel once that is open.
    """

    def __init__(self, resource: Resource, request: SessionRequest,
                 recorder: AsciicastRecorder | None, redact: Callable[[str], str]) -> None:
        self.resource, self.request, self.recorder, self._redact = resource, request, recorder, redact
        self._connection: asyncssh.SSHClientConnection | None = None
        self._process: asyncssh.SSHClientProcess | None = None
        self._ready: asyncio.Future[None] | None = None
        self._size = (request.cols, request.rows)
        # Remote stderr on its own (marked on the terminal channel) for a client that asked, without
        # a PTY (a PTY has one output stream); else merged into stdout, as older clients expect.
        self.split_stderr = bool(getattr(request, "stderr", False)) and not request.pty

    def start(self) -> None:
        self._ready = asyncio.ensure_future(self._open())

    async def wait_ready(self) -> None:
        """Until the process runs; raises what the connect or the process start raised."""
        assert self._ready is not None, "start() first"
        await asyncio.shield(self._ready)

    @property
    def process(self) -> asyncssh.SSHClientProcess:
        assert self._process is not None, "wait_ready() first"
        return self._process

    def redact(self, text: str) -> str:
        return self._redact(text)

    def _auth_options(self) -> dict[str, Any]:
        r = self.resource
        options: dict[str, Any] = {"username": r.username, "config": None, "agent_path": None,
                                   "client_keys": None, "password": r.password,
                                   "connect_timeout": SSH_CONNECT_TIMEOUT_S}
        if r.private_key:
            options["client_keys"] = [asyncssh.import_private_key(r.private_key)]
        if r.insecure_skip_host_key_check:
            options["known_hosts"] = None
        elif r.known_hosts:
            options["known_hosts"] = r.known_hosts
        return options

    async def _open(self) -> None:
        self._connection = await asyncssh.connect(self.resource.host, self.resource.port, **self._auth_options())
        request = self.request
        pty = dict(term_type=request.term, term_size=self._size) if request.pty else dict(request_pty=False)
        self._process = await self._connection.create_process(
            request.command, encoding=None, stderr=asyncssh.PIPE if self.split_stderr else asyncssh.STDOUT,
            window=SSH_WINDOW, **pty)
        if request.pty and self._size != (request.cols, request.rows):
            self._process.change_terminal_size(*self._size)

    def resize(self, cols: int, rows: int) -> None:
        self._size = (cols, rows)
        if self.recorder:
            self.recorder.resize(cols, rows)
        if self._process is not None and self.request.pty:
            self._process.change_terminal_size(cols, rows)

    async def run(self, pipe: ChannelPipe) -> None:
        """Carry the session on the terminal channel; exit status or error in-band, then close."""
        assert self._ready is not None, "start() first"
        try:
            await pipe.wait_open()
            try:
                await self._ready
            except Exception as exc:
                reason = self._redact(ssh_failure_reason(exc, self.resource))
                log.warning("ssh session on %s could not start: %s", self.resource.name, reason)
                pipe.fail(reason)
                return
            status = await _until(self._from_process(pipe), self._to_process(pipe))
            pipe.control("exit", status=status)
        except ChannelClosed:
            pass
        except (asyncssh.Error, OSError) as exc:
            pipe.fail(self._redact(ssh_failure_reason(exc, self.resource)))
        finally:
            pipe.close()
            self.close()

    async def _to_process(self, pipe: ChannelPipe) -> None:
        """Client keystrokes to the process, until an in-band eof closes its stdin."""
        stdin = self._process.stdin
        while True:
            item = await pipe.receive()
            if isinstance(item, bytes):
                stdin.write(item)
                await stdin.drain()
                pipe.delivered(len(item))
            elif item.get("op") == "eof":
                stdin.write_eof()
                return

    async def _from_process(self, pipe: ChannelPipe) -> int:
        """Process output to the client (and the recording); returns the exit status."""
        while True:
            data = await self._process.stdout.read(READ_SIZE)
            if not data:
                break
            if self.recorder:
                self.recorder.output(data)
            await pipe.send(data)
        await self._process.wait()
        return _exit_status(self._process)

    def close(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self.recorder:
            self.recorder.close()
