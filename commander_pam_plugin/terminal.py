"""The local half of `pam launch`: the user's terminal (or a pipe) on one side, the remote on the other.

The data plane hands remote output in from its own threads (feed_*); run() owns the main
thread and the terminal. Everything meets in one selectors loop woken by a self-pipe, so
nothing polls or sleeps, and the terminal modes are restored on every way out.
"""
from __future__ import annotations

import contextlib
import enum
import errno
import os
import selectors
import signal
import sys
import termios
import threading
import tty
from collections import deque
from typing import Iterator, Protocol, TextIO

from .protocol import MAX_TERMINAL_SIZE

DEFAULT_SIZE = (80, 24)
DISCONNECT_STATUS = 255  # what ssh returns when the connection, not the command, ended
SIGPIPE_STATUS = 128 + signal.SIGPIPE  # what a shell reports for a writer killed by a closed pipe
_READ_SIZE = 64 * 1024
_CR, _LF = 0x0D, 0x0A

ESCAPE_HELP = (
    "Supported escape sequences:",
    " {e}.   - terminate connection",
    " {e}?   - this message",
    " {e}{e}   - send the escape character by typing it twice",
    "(Note that escapes are only recognized immediately after newline.)",
)


class RemoteEnd(Protocol):
    """What the data plane offers the terminal; every call is thread-safe."""

    def send(self, data: bytes) -> None:
        """Bytes for the remote stdin; may block briefly for flow control."""

    def send_eof(self) -> None:
        """The local stdin closed (pipe mode)."""

    def resize(self, cols: int, rows: int) -> None:
        """The local window changed size."""

    def close(self) -> None:
        """The user disconnected, or the session is over."""

    # Optional, for flow control (a remote without them is never back-pressured here):
    # writable() -> bool: False while the remote holds too much unsent input; the runner then
    #   stops reading stdin (it never blocks in send(), so output keeps flowing meanwhile);
    # on_writable(callback): the remote calls callback() from any thread when writable again;
    # delivered(size): `size` bytes of output reached stdout (the remote grants that much credit).


def terminal_size(fd: int) -> tuple[int, int]:
    """(cols, rows) of the terminal on fd, clamped to the protocol's limit; (80, 24) if unknown."""
    try:
        cols, rows = os.get_terminal_size(fd)
    except OSError:
        return DEFAULT_SIZE
    if cols <= 0 or rows <= 0:  # a pty nobody has sized yet reports 0x0
        return DEFAULT_SIZE
    return min(cols, MAX_TERMINAL_SIZE), min(rows, MAX_TERMINAL_SIZE)


def is_interactive(stdin_fd: int) -> bool:
    """A terminal on stdin means PTY mode (raw, resizable); anything else is pipe mode."""
    return os.isatty(stdin_fd)


class Escape(enum.Enum):
    """A local command typed as an ssh-style escape sequence."""

    DISCONNECT = "disconnect"
    HELP = "help"


class EscapeFilter:
    """Decides, byte by byte, what typed input reaches the remote and what is an escape.

    Same rules as ssh: the escape character counts only at the start of a line (after CR or
    LF, or as the very first byte); then "." disconnects, "?" asks for help, a second escape
    character sends one, and anything else sends both bytes.
    """

    def __init__(self, escape_char: str = "~") -> None:
        if len(escape_char) != 1 or not escape_char.isascii():
            raise ValueError("the escape character must be a single ASCII character")
        self._escape = ord(escape_char)
        self._line_start = True
        self._pending = False

    def feed(self, data: bytes) -> list[bytes | Escape]:
        """Split typed bytes into chunks to send and escapes, in order; none after a disconnect."""
        out: list[bytes | Escape] = []
        chunk = bytearray()

        def flush() -> None:
            if chunk:
                out.append(bytes(chunk))
                chunk.clear()

        for byte in data:
            if self._pending:
                self._pending = False
                if byte == ord("."):
                    flush()
                    out.append(Escape.DISCONNECT)
                    return out
                if byte == ord("?"):
                    flush()
                    out.append(Escape.HELP)
                    continue  # still at line start, as in ssh: "~?" then "~." works
                if byte != self._escape:
                    chunk.append(self._escape)
            elif self._line_start and byte == self._escape:
                self._pending = True
                continue
            chunk.append(byte)
            self._line_start = byte in (_CR, _LF)
        flush()
        return out


class _Stderr(bytes):
    """Remote stderr (pipe mode and --command): written to the local stderr."""


class _Notice(str):
    """A line for the user that does not end the session (connection re-established, ...)."""


class TerminalRunner:
    """Pumps bytes between the local terminal (or pipe) and a RemoteEnd until the session ends.

    feed_output/feed_exit/feed_error may be called from any thread, also before run(); they
    queue and wake the loop. run() is called once, from the thread that owns the terminal.
    """

    def __init__(
        self,
        remote: RemoteEnd,
        stdin_fd: int = 0,
        stdout_fd: int = 1,
        stderr: TextIO = sys.stderr,
        escape_char: str | None = "~",
    ) -> None:
        self._remote = remote
        self._stdin_fd = stdin_fd
        self._stdout_fd = stdout_fd
        self._stderr = stderr
        self._escapes = EscapeFilter(escape_char) if escape_char is not None else None
        self._escape_char = escape_char
        self._lock = threading.Lock()
        # Output (bytes), then at most one end: an exit status (int) or a failure reason (str).
        self._events: deque[bytes | int | str] = deque()  # also _Stderr (bytes) and _Notice (str)
        self._finished = False
        self._winched = False
        self._last_output = b"\n"
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._writable = getattr(remote, "writable", lambda: True)
        self._delivered = getattr(remote, "delivered", None)
        if hasattr(remote, "on_writable"):
            remote.on_writable(self._wake_from_remote)

    def _wake_from_remote(self) -> None:
        with self._lock:
            if not self._finished:
                self._wake()

    # -- called by the data plane, from its threads --------------------------------------

    def feed_output(self, data: bytes) -> None:
        """Remote output, written to stdout in order (as is: a remote PTY already sends CRLF)."""
        if data:
            self._post(bytes(data))

    def feed_stderr(self, data: bytes) -> None:
        """Remote stderr, written to the local stderr in order with the output."""
        if data:
            self._post(_Stderr(data))

    def feed_notice(self, text: str) -> None:
        """One line on stderr (on a line of its own, in raw mode too); the session goes on."""
        self._post(_Notice(text))

    def feed_exit(self, status: int) -> None:
        """The remote command ended; run() returns `status` once earlier output is written."""
        self._post(int(status))

    def feed_error(self, reason: str) -> None:
        """The session failed (peer lost, target refused): run() reports it and returns 255."""
        self._post(str(reason))

    def _post(self, event: bytes | int | str) -> None:
        with self._lock:
            if self._finished:  # late news after run() ended; the wake pipe is closed
                return
            self._events.append(event)
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # pipe full: the loop is already due to wake
            pass

    # -- the main-thread side -----------------------------------------------------------

    def run(self) -> int:
        """Pump until the remote exits, fails or the user disconnects; returns the exit status."""
        interactive = is_interactive(self._stdin_fd)
        try:
            with _raw_mode(self._stdin_fd, interactive), self._winch_handler(interactive):
                status, message = self._pump(interactive)
        finally:
            self._finish()
        if message is not None:  # the terminal is cooked again: a plain newline is enough
            self._say(message)
        return status

    def _pump(self, interactive: bool) -> tuple[int, str | None]:
        escapes = self._escapes if interactive else None
        with _new_selector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            selector.register(self._stdin_fd, selectors.EVENT_READ)
            self._stdin_open, reading = True, True
            while True:
                if self._winched:  # before typed input, so a command sees the new size
                    self._winched = False
                    self._remote.resize(*terminal_size(self._stdin_fd))
                outcome = self._drain_events()
                if outcome is not None:
                    return outcome
                # Back-pressure: stop reading stdin while the remote cannot take more input.
                want = self._stdin_open and self._writable()
                if want != reading:
                    if want:
                        selector.register(self._stdin_fd, selectors.EVENT_READ)
                    else:
                        selector.unregister(self._stdin_fd)
                    reading = want
                ready = {key.fd for key, _ in selector.select()}
                if self._wake_r in ready:
                    _drain_pipe(self._wake_r)
                if self._stdin_fd in ready:
                    outcome = self._read_stdin(selector, escapes)
                    if outcome is not None:
                        return outcome

    def _drain_events(self) -> tuple[int, str | None] | None:
        with self._lock:
            events, self._events = self._events, deque()
        for event in events:
            if isinstance(event, _Stderr):
                self._write_stderr(event)
                if self._delivered is not None:
                    self._delivered(len(event))
            elif isinstance(event, _Notice):
                self._notice(str(event))
            elif isinstance(event, bytes):
                if not self._write_output(event):
                    return SIGPIPE_STATUS, None  # stdout closed: end quietly, like `ssh | head`
                if self._delivered is not None:
                    self._delivered(len(event))
            elif isinstance(event, int):
                return event, None
            else:
                return DISCONNECT_STATUS, f"error: {event}"
        return None

    def _read_stdin(
        self, selector: selectors.BaseSelector, escapes: EscapeFilter | None
    ) -> tuple[int, str | None] | None:
        data = _read_input(self._stdin_fd)
        if data is None:
            return None
        if not data:  # end of input: the remote hears it once and we keep pumping output
            self._stdin_open = False  # the loop stops selecting it
            self._remote.send_eof()
            return None
        return self._send_typed(data, escapes)

    def _send_typed(
        self, data: bytes, escapes: EscapeFilter | None
    ) -> tuple[int, str | None] | None:
        if escapes is None:
            self._remote.send(data)
            return None
        for item in escapes.feed(data):
            if isinstance(item, bytes):
                self._remote.send(item)
            elif item is Escape.DISCONNECT:
                return DISCONNECT_STATUS, "Connection to remote closed."
            else:
                lines = (line.format(e=self._escape_char) for line in ESCAPE_HELP)
                self._stderr.write("".join(f"{line}\r\n" for line in lines))  # raw mode: CRLF
                self._stderr.flush()
        return None

    def _write_output(self, data: bytes) -> bool:
        """Write all of data to stdout; False when the reader has gone away."""
        try:
            _write_all(self._stdout_fd, data)
        except BrokenPipeError:
            return False
        self._last_output = data[-1:]
        return True

    def _write_stderr(self, data: bytes) -> None:
        self._stderr.flush()
        binary = getattr(self._stderr, "buffer", None)
        try:
            if binary is not None:
                binary.write(data)
                binary.flush()
            else:
                self._stderr.write(data.decode("utf-8", "replace"))
                self._stderr.flush()
        except (BrokenPipeError, ValueError):  # stderr closed: the output goes on without it
            pass

    def _notice(self, message: str) -> None:
        """Like _say, while the terminal may be raw (CRLF) and the session goes on."""
        lead = "\r\n" if os.isatty(self._stdout_fd) and self._last_output not in (b"\n", b"\r") else ""
        self._stderr.write(f"{lead}{message}\r\n" if os.isatty(self._stdin_fd) else f"{message}\n")
        self._stderr.flush()
        self._last_output = b"\n"

    def _say(self, message: str) -> None:
        """One line on stderr, on a line of its own even if the remote left the cursor mid-line."""
        if os.isatty(self._stdout_fd) and self._last_output not in (b"\n", b"\r"):
            message = "\n" + message
        self._stderr.write(message + "\n")
        self._stderr.flush()

    def _finish(self) -> None:
        with self._lock:
            self._finished = True
            self._events.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._remote.close()

    @contextlib.contextmanager
    def _winch_handler(self, interactive: bool) -> Iterator[None]:
        """Forward window-size changes; Python only lets the main thread install handlers."""
        if not interactive or threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_winch(signum: int, frame: object) -> None:
            # Only flag it: the handler may run while the loop is inside remote.send().
            self._winched = True

        previous = signal.signal(signal.SIGWINCH, on_winch)
        # The signal may land on another thread; the wakeup fd still breaks our select().
        previous_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        try:
            # Closes the gap between the size the session opened with and our handler.
            self._winched = True
            yield
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            signal.signal(signal.SIGWINCH, previous)


@contextlib.contextmanager
def _raw_mode(fd: int, enabled: bool) -> Iterator[None]:
    """Raw mode on a terminal for the block, and the exact previous modes back on any exit."""
    if not enabled:
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSADRAIN)  # TCSADRAIN keeps type-ahead for the remote
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _new_selector() -> selectors.BaseSelector:
    # epoll refuses regular files (stdin redirected from a file) and macOS poll() ignores
    # ttys; poll on Linux and select elsewhere handle pipes, files and terminals alike.
    if sys.platform.startswith("linux"):
        return selectors.PollSelector()
    return selectors.SelectSelector()


def _read_input(fd: int) -> bytes | None:
    """Typed or piped bytes; b"" at end of input (a hung-up terminal too); None if not ready."""
    try:
        return os.read(fd, _READ_SIZE)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno == errno.EIO:
            return b""
        raise


def _drain_pipe(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass


def _write_all(fd: int, data: bytes) -> None:
    """os.write until everything is out; waits (without spinning) if the fd is non-blocking."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            with _new_selector() as selector:
                selector.register(fd, selectors.EVENT_WRITE)
                selector.select()
