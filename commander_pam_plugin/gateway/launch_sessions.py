"""`pam launch` sessions that outlive their client's peer: held, resumed, or expired.

One job: keep an SSH session (and its PTY) apart from the conversation that opened it, so that a
client whose network dropped can come back through a new conversation and continue where it left
off (docs/PROTOCOL.md section 7). Output is numbered by byte offset and kept until the client
acknowledges it; input is numbered the same way by the client. While no client is attached the
output keeps being read (the remote program never stalls) up to the resource's bound; a session
whose client stays away past its grace period, or produces more than the bound meanwhile, ends
with that reason in the recording and the gateway's log.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Iterator

import asyncssh

from .config import Resource
from .targets import CHUNK, READ_SIZE, ChannelClosed, ChannelPipe, SshTerminal, ssh_failure_reason

log = logging.getLogger(__name__)

STDOUT, STDERR = "stdout", "stderr"
INPUT_ACK_BYTES = 16 * 1024  # acknowledge input at once past this much, else after INPUT_ACK_DELAY_S
INPUT_ACK_DELAY_S = 0.25
ENDED_MEMORY = 256  # ended sessions remembered (per gateway) so that a late resume hears why
ATTACHED_ELSEWHERE = "the session is attached to another client; one client at a time"
MAX_BAD_SECRETS = 5  # wrong secrets for one session before it refuses every further attempt


class OutputLog:
    """Remote output numbered from 0: what is kept is [base, end); trimmed as the client acknowledges.

    Chunks are kept as read (no copy, no merging): the common case, sending a chunk whole from
    its start, hands the very same bytes object on."""

    def __init__(self) -> None:
        self.base = 0  # the first byte the client has not acknowledged
        self.end = 0
        self._chunks: deque[tuple[str, bytes]] = deque()
        self._first = 0  # offset of the first kept chunk (<= base)

    @property
    def held(self) -> int:
        return self.end - self.base

    def append(self, stream: str, data: bytes) -> None:
        self._chunks.append((stream, data))
        self.end += len(data)

    def read(self, position: int, limit: int) -> tuple[str, bytes] | None:
        """Up to `limit` bytes of one stream from `position` (base <= position <= end); None at the end."""
        offset = self._first
        for stream, data in self._chunks:
            if position < offset + len(data):
                start = position - offset
                return stream, (data if start == 0 and len(data) <= limit else data[start:start + limit])
            offset += len(data)
        return None

    def trim(self, acknowledged: int) -> None:
        """Forget output the client holds (acknowledged never moves back, never past end)."""
        self.base = max(self.base, min(acknowledged, self.end))
        while self._chunks and self._first + len(self._chunks[0][1]) <= self.base:
            self._first += len(self._chunks.popleft()[1])


class LaunchSession:
    """One SSH session and its numbered output, attached to at most one conversation at a time."""

    def __init__(self, sessions: LaunchSessions, user: str, resource: Resource, ssh: SshTerminal,
                 resumable: bool) -> None:
        self.sessions, self.user, self.resource, self.ssh = sessions, user, resource, ssh
        self.session_id = secrets.token_urlsafe(12)
        self.secret = secrets.token_urlsafe(32)
        self.resumable = resumable and resource.resume_grace_s > 0
        self.output = OutputLog()
        self.sent = 0  # output offset the attached sender has handed to its channel
        self.input_written = 0  # input bytes written to the process's stdin
        self.input_eof = False
        self.attached: str | None = None  # conversation id
        self.last_conversation: str | None = None
        self.detached_at: float | None = None
        self.exit_status: int | None = None
        self.failure: str | None = None
        self.ended: str | None = None  # the reason, once ended
        self.bad_secrets = 0
        self.opened_at = time.monotonic()  # session limits count from here, across resumes
        self._grown = asyncio.Event()  # output appended or the process finished
        self._caught_up = asyncio.Event()  # the attached sender has sent everything read so far
        self._caught_up.set()
        # Output is first read once a channel is open (or the client is away): as before resume,
        # asyncssh's window alone holds what the process writes before the client can take it.
        self._started = asyncio.Event()
        self._grace: asyncio.TimerHandle | None = None
        self._readers: list[asyncio.Future[Any]] = []
        self._finished = False

    # --- the process side ------------------------------------------------------------------

    def start(self) -> None:
        """Read the process once it is up (the SSH connect began in ssh.start(), overlapping ICE)."""
        self._readers.append(asyncio.ensure_future(self._read_process()))

    async def _read_process(self) -> None:
        try:
            await self.ssh.wait_ready()
        except Exception as exc:
            self.failure = self.ssh.redact(ssh_failure_reason(exc, self.resource))
            log.warning("ssh session on %s could not start: %s", self.resource.name, self.failure)
            self._finish()
            return
        process = self.ssh.process
        await self._started.wait()
        readers = [self._read(STDOUT, process.stdout)]
        if self.ssh.split_stderr:
            readers.append(self._read(STDERR, process.stderr))
        try:
            await asyncio.gather(*readers)
            await process.wait()
            self.exit_status = _exit_status(process)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # asyncssh.Error, OSError
            self.failure = self.ssh.redact(ssh_failure_reason(exc, self.resource))
        self._finish()

    async def _read(self, stream: str, reader: Any) -> None:
        while True:
            if self.attached is not None:
                await self._caught_up.wait()  # back-pressure: read on once the client has it all
            data = await reader.read(READ_SIZE)
            if not data:
                return
            if self.ssh.recorder:
                self.ssh.recorder.output(data)
            for start in range(0, len(data), CHUNK):  # message-sized: the channel sends these very
                self.output.append(stream, data[start:start + CHUNK])  # objects, kept output is no second copy
            if self.attached is not None:
                self._caught_up.clear()
            self._grown.set()
            if self.attached is None and self.output.held > self.resource.resume_buffer_bytes:
                self.end(f"the client was away with more than {self.resource.resume_buffer_bytes} bytes "
                         "of output waiting for it")
                return

    def _finish(self) -> None:
        self._finished = True
        self._grown.set()

    # --- a conversation's side --------------------------------------------------------------

    async def attach(self, pipe: ChannelPipe, conversation_id: str, output_from: int,
                     resumed: bool = False) -> None:
        """Carry the session on `pipe` until the process ends (then end) or the channel goes (then detach)."""
        self.attached = self.last_conversation = conversation_id
        self._cancel_grace()
        try:
            await pipe.wait_open()
        except ChannelClosed:
            self.detach(conversation_id, "the terminal channel closed before it opened")
            return
        self._started.set()
        if resumed:
            away = time.monotonic() - (self.detached_at or time.monotonic())
            self._event(f"resumed by conversation {conversation_id} after {away:.1f} s "
                        f"(replaying {self.output.end - output_from} bytes of output)", "resumed")
            pipe.control("resumed", input=self.input_written, eof=self.input_eof, output=output_from)
        elif self.resumable:
            pipe.control("session", id=self.session_id, secret=self.secret, grace=self.resource.resume_grace_s)
        self.detached_at = None
        self.sent = output_from
        complete = False
        try:
            receiver = asyncio.ensure_future(self._receive(pipe))
            sender = asyncio.ensure_future(self._send(pipe))
            try:
                done, _ = await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
                if sender in done:
                    complete = sender.result()
                else:
                    receiver.result()
                    complete = await sender  # stdin ended (eof): output goes on
            finally:
                for task in (receiver, sender):
                    task.cancel()
                await asyncio.gather(receiver, sender, return_exceptions=True)
        except ChannelClosed:
            pass
        finally:
            pipe.close()
            if complete:
                self.end("exited" if self.failure is None else self.failure)
            elif self.attached == conversation_id:
                self.detach(conversation_id, "the terminal channel closed")

    async def _send(self, pipe: ChannelPipe) -> bool:
        """Output from `self.sent` on; True once the end (exit or failure) went out too."""
        while True:
            piece = self.output.read(self.sent, CHUNK)
            if piece is not None:
                stream, data = piece
                if stream == STDERR:
                    pipe.control("stderr", size=len(data))
                await pipe.send(data)
                self.sent += len(data)
                continue
            self._caught_up.set()
            if self._finished and self.ended is None:
                if self.failure is not None:
                    pipe.fail(self.failure)
                else:
                    pipe.control("exit", status=self.exit_status if self.exit_status is not None else 255)
                return True
            if self.ended is not None:
                pipe.fail(f"the session ended: {self.ended}")
                return True
            self._grown.clear()
            await self._grown.wait()

    async def _receive(self, pipe: ChannelPipe) -> None:
        """Keystrokes to the process, acknowledged by offset; output acknowledgements trim the log."""
        ack = _InputAck(pipe, lambda: self.input_written)
        try:
            stdin = await self._stdin()
            while True:
                item = await pipe.receive()
                if isinstance(item, bytes):
                    if stdin is not None and not self.input_eof:
                        try:
                            stdin.write(item)
                            await stdin.drain()
                        except (OSError, asyncssh.Error):  # the process is gone: its end is on the way
                            stdin = None
                    pipe.delivered(len(item))
                    self.input_written += len(item)
                    ack.written()
                elif item.get("op") == "ack":
                    value = item.get("output")
                    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= self.sent:
                        self.output.trim(value)
                elif item.get("op") == "eof" and not self.input_eof:
                    self.input_eof = True
                    if stdin is not None:
                        stdin.write_eof()
                    ack.now()
        finally:
            ack.cancel()
        # (returns only through ChannelClosed or cancellation: the output side decides the end)

    async def _stdin(self) -> Any:
        try:
            await self.ssh.wait_ready()
        except Exception:  # the output side reports the failure
            return None
        return self.ssh.process.stdin

    def detach(self, conversation_id: str, reason: str) -> None:
        """The attached client went away: hold the session for the grace period (or end it)."""
        if self.attached != conversation_id or self.ended is not None:
            return
        self.attached = None
        self._caught_up.set()
        self._started.set()
        if not self.resumable:
            self.end(reason)
            return
        self.detached_at = time.monotonic()
        grace = self.resource.resume_grace_s
        self._event(f"held for {grace:g} s: {reason} ({self.output.held} bytes of output kept)", "held")
        self._grace = asyncio.get_running_loop().call_later(grace, self._expire)

    def released(self, conversation_id: str, reason: str, peer_lost: bool) -> None:
        """Its conversation closed: a lost peer detaches (the session is held); any other close
        (the client's own close, the gateway stopping, ICE never connecting) ends the session."""
        if self.last_conversation != conversation_id:
            return
        if peer_lost:
            self.detach(conversation_id, reason)
        else:
            self.end(reason)

    def _expire(self) -> None:
        self._grace = None
        if self.attached is None and self.ended is None:
            self.end(f"the client did not come back within the grace period of {self.resource.resume_grace_s:g} s",
                     "expired")

    def end(self, reason: str, kind: str = "ended") -> None:
        if self.ended is not None:
            return
        self.ended = reason
        self._cancel_grace()
        self._event(reason, kind)
        self._grown.set()
        for task in self._readers:
            if task is not asyncio.current_task():
                task.cancel()
        self.ssh.close()
        self.sessions.forget(self, reason)

    def _cancel_grace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def _event(self, text: str, kind: str) -> None:
        """One gateway log line and one recording marker (asciicast 'm') per held/resumed/expired/ended."""
        log.info("launch session %s (%s, %s) %s: %s", self.session_id, self.user, self.resource.name, kind, text)
        if self.ssh.recorder:
            self.ssh.recorder.marker(f"{kind}: {text}")
        if self.sessions.on_event is not None:
            self.sessions.on_event(self, kind, text)


class _InputAck:
    """Acknowledges written input: at once past INPUT_ACK_BYTES, else shortly after the last write."""

    def __init__(self, pipe: ChannelPipe, written: Callable[[], int]) -> None:
        self._pipe, self._written = pipe, written
        self._acked = 0
        self._timer: asyncio.TimerHandle | None = None

    def written(self) -> None:
        if self._written() - self._acked >= INPUT_ACK_BYTES:
            self.now()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(INPUT_ACK_DELAY_S, self.now)

    def now(self) -> None:
        self.cancel()
        if self._written() != self._acked:
            self._acked = self._written()
            self._pipe.control("ack", input=self._acked)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class LaunchSessions:
    """Every launch session of one gateway by id, and why recently ended ones ended."""

    def __init__(self, on_event: Callable[[LaunchSession, str, str], None] | None = None) -> None:
        self.on_event = on_event  # (session, kind, text): the gateway's audit trail hears each change
        self._live: dict[str, LaunchSession] = {}
        self._ended: OrderedDict[str, tuple[str, str]] = OrderedDict()  # id -> (user, reason)

    def open(self, conversation_id: str, user: str, resource: Resource, ssh: SshTerminal,
             resumable: bool) -> LaunchSession:
        session = LaunchSession(self, user, resource, ssh, resumable)
        self._live[session.session_id] = session
        session.last_conversation = conversation_id
        session.start()
        return session

    def forget(self, session: LaunchSession, reason: str) -> None:
        if self._live.pop(session.session_id, None) is not None:
            self._ended[session.session_id] = (session.user, reason)
            while len(self._ended) > ENDED_MEMORY:
                self._ended.popitem(last=False)

    def end_all(self, reason: str) -> None:
        for session in list(self._live.values()):
            session.end(reason)

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[LaunchSession]:
        return iter(list(self._live.values()))

    def get(self, session_id: str) -> LaunchSession | None:
        return self._live.get(session_id)

    def offer_refusal(self, session_id: str, user: str, resource: str) -> tuple[int, str] | None:
        """Why a resume offer (checked by the router-authenticated user) is refused, or None.

        Another user's session and an unknown id read the same, so ids cannot be probed."""
        session = self._live.get(session_id)
        if session is not None and session.user == user and session.resource.name == resource:
            return None
        ended = self._ended.get(session_id)
        if session is None and ended is not None and ended[0] == user:
            return 410, f"the session on {resource} has ended: {ended[1]}"
        return 404, f"no session {session_id[:64]} on {resource} to resume"

    def claim(self, session_id: str, user: str, secret: Any, received: Any) -> tuple[LaunchSession | None, str]:
        """The session a resume hello (over the new data channel) may attach to, or why not."""
        session = self._live.get(session_id)
        if session is None or session.user != user:
            ended = self._ended.get(session_id)
            return None, (f"the session has ended: {ended[1]}" if ended and ended[0] == user
                          else "no such session to resume")
        if session.bad_secrets >= MAX_BAD_SECRETS:
            return None, "this session refuses further resume attempts (too many wrong secrets)"
        if not isinstance(secret, str) or not secrets.compare_digest(secret.encode(), session.secret.encode()):
            session.bad_secrets += 1
            log.warning("launch session %s (%s): resume refused: wrong secret", session_id, user)
            return None, "wrong resume secret"
        if session.attached is not None:  # may be this client's own lost peer, not yet seen as lost
            return None, ATTACHED_ELSEWHERE
        if not (isinstance(received, int) and not isinstance(received, bool)
                and session.output.base <= received <= session.output.end):
            return None, (f"the client's output offset {str(received)[:24]} is outside what the gateway kept "
                          f"({session.output.base} to {session.output.end})")
        return session, ""


def _exit_status(process: Any) -> int:
    code = process.returncode
    if code is None:
        return 255
    return code if code >= 0 else 128 - code
