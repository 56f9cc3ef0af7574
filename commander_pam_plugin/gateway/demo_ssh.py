"""A throwaway SSH server on 127.0.0.1 for tests and for `pam launch demo`.

It accepts one user with a fresh random password (and optionally given public keys), uses
an ephemeral host key, and runs the local login shell (or the requested command) as the
current OS user, in a real PTY when the client asks for one, so terminal type, window size
and window changes behave as they would on a real host.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import getpass
import hmac
import os
import pty
import pwd
import secrets
import signal
import struct
import termios
from typing import Sequence

import asyncssh

_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
OUTPUT_GRACE_S = 2.0


class _Auth(asyncssh.SSHServer):
    """One user: the password (compared in constant time) or, if given, its public keys."""

    def __init__(self, username: str, password: str, keys: asyncssh.SSHAuthorizedKeys | None) -> None:
        self._username, self._password, self._keys = username, password, keys
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn

    def begin_auth(self, username: str) -> bool:
        if self._keys is not None and self._conn is not None and username == self._username:
            self._conn.set_authorized_keys(self._keys)
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return username == self._username and hmac.compare_digest(password.encode(), self._password.encode())

    def public_key_auth_supported(self) -> bool:
        return self._keys is not None


def _take_controlling_tty() -> None:  # pragma: no cover - runs in the child
    """In the child, after setsid: make the PTY (stdin) the controlling terminal, for job control."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class DemoSSHServer:
    """`await DemoSSHServer().start()`; then `.port`, `.username`, `.password`; `.close()`."""

    def __init__(self, username: str | None = None, authorized_keys: Sequence[asyncssh.SSHKey] = ()) -> None:
        self.username = username or getpass.getuser()
        self.password = secrets.token_urlsafe(18)
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self._keys = asyncssh.import_authorized_keys(
            "".join(k.export_public_key().decode() for k in authorized_keys)) if authorized_keys else None
        self._server: asyncssh.SSHAcceptor | None = None
        self.port = 0
        self._sessions: set[asyncio.Task[None]] = set()

    async def start(self) -> DemoSSHServer:
        self._server = await asyncssh.create_server(
            lambda: _Auth(self.username, self.password, self._keys), "127.0.0.1", 0,
            server_host_keys=[self.host_key], process_factory=self._run, encoding=None,
            allow_scp=False, sftp_factory=None)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def known_hosts_line(self) -> str:
        """A known_hosts entry for this server, for clients that check host keys."""
        return f"[127.0.0.1]:{self.port} {self.host_key.export_public_key().decode().strip()}\n"

    async def sessions_done(self) -> None:
        """Until every session's handler, its cleanup included, has returned."""
        while self._sessions:
            await asyncio.wait(set(self._sessions))

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    # --- one session --------------------------------------------------------------------

    @staticmethod
    def _argv_env(process: asyncssh.SSHServerProcess) -> tuple[list[str], dict[str, str], str]:
        account = pwd.getpwuid(os.getuid())
        shell = account.pw_shell or "/bin/sh"
        env = {k: os.environ[k] for k in _ENV_KEEP if k in os.environ}
        env.update(HOME=account.pw_dir, USER=account.pw_name, LOGNAME=account.pw_name, SHELL=shell)
        if process.term_type:
            env["TERM"] = process.term_type
        argv = [shell, "-c", process.command] if process.command else [shell, "-l"]
        return argv, env, account.pw_dir

    async def _run(self, process: asyncssh.SSHServerProcess) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._sessions.add(task)
            task.add_done_callback(self._sessions.discard)
        argv, env, home = self._argv_env(process)
        status = 127
        try:
            status = await (_run_pty(process, argv, env, home) if process.term_type
                            else _run_pipes(process, argv, env, home))
        except OSError as exc:  # the shell did not start, or the client went away mid-write
            if not process.is_closing():
                process.stderr.write(f"cannot start {argv[0]}: {exc.strerror}\r\n".encode())
        finally:
            # Also when the connection dropped: exit() is then a no-op, and wait_closed() runs
            # asyncssh's cleanup of the redirected pipes (else "coroutine 'Event.wait' was never
            # awaited"). Bounded: a loop torn down under a live session must not hang on it.
            process.exit(status)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait_closed(), OUTPUT_GRACE_S)


async def _copy(source: asyncio.StreamReader, sink: asyncssh.SSHWriter) -> None:
    """Child output to the SSH channel until EOF."""
    while data := await source.read(65536):
        sink.write(data)


class _PtyOutput(asyncio.Protocol):
    """PTY master output to the SSH channel. The master reports EIO once the child side has
    closed; that is EOF here, after every buffered byte (a StreamReader would drop them)."""

    def __init__(self, sink: asyncssh.SSHWriter, done: asyncio.Future[None]) -> None:
        self._sink, self._done = sink, done

    def data_received(self, data: bytes) -> None:
        if not self._sink.channel.is_closing():  # output after the client left goes nowhere
            self._sink.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_result(None)


async def _run_pipes(process: asyncssh.SSHServerProcess, argv: list[str], env: dict[str, str], home: str) -> int:
    child = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                 env=env, cwd=home)
    try:
        await process.redirect(stdin=child.stdin)
        await asyncio.gather(_copy(child.stdout, process.stdout), _copy(child.stderr, process.stderr))
        return _status(await child.wait())
    finally:
        if child.returncode is None:  # the client went away before the command ended: end it too
            child.kill()
            await child.wait()


async def _run_pty(process: asyncssh.SSHServerProcess, argv: list[str], env: dict[str, str], home: str) -> int:
    master, slave = pty.openpty()
    cols, rows = process.term_size[:2]
    # Size the PTY before the child starts, so a quick command already sees it.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    try:
        child = await asyncio.create_subprocess_exec(*argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                                     cwd=home, start_new_session=True,
                                                     preexec_fn=_take_controlling_tty)
    except OSError:
        os.close(master)
        raise
    finally:
        os.close(slave)
    loop = asyncio.get_running_loop()
    drained: asyncio.Future[None] = loop.create_future()
    transport, _ = await loop.connect_read_pipe(lambda: _PtyOutput(process.stdout, drained),
                                                os.fdopen(os.dup(master), "rb", buffering=0))
    # asyncssh applies later window changes to a tty it writes to.
    tty_input = os.fdopen(master, "wb", buffering=0)
    try:
        await process.redirect(stdin=tty_input, recv_eof=False)
        code = await _wait_child_or_hangup(process, child)
        try:
            # A background job still holding the PTY open must not stall the exit status.
            await asyncio.wait_for(drained, OUTPUT_GRACE_S)
        except asyncio.TimeoutError:
            pass
    finally:
        transport.close()
        if process.is_closing():
            tty_input.close()  # asyncssh closes it on a normal end, not when the connection drops
    return _status(code)


async def _wait_child_or_hangup(process: asyncssh.SSHServerProcess, child: asyncio.subprocess.Process) -> int:
    """The child's exit code; if the client goes away first, hang the child up as sshd would."""
    exited = asyncio.ensure_future(child.wait())
    closed = asyncio.ensure_future(process.channel.wait_closed())
    await asyncio.wait({exited, closed}, return_when=asyncio.FIRST_COMPLETED)
    closed.cancel()
    if not exited.done():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGHUP)
        try:
            await asyncio.wait_for(asyncio.shield(exited), OUTPUT_GRACE_S)
        except asyncio.TimeoutError:
            child.kill()
    return await exited


def _status(code: int) -> int:
    return code if code >= 0 else 128 - code
