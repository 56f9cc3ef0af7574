"""The local terminal half of `pam launch`, driven in a real pseudo-terminal.

The remote end here is real too: /bin/sh in its own pty (as the gateway's SSH PTY would be)
or on pipes (pipe mode), pumped by a thread the way the data plane will. Run as a script,
this file is the program under test: `python tests/test_terminal.py [error]`.
"""
from __future__ import annotations

import fcntl
import io
import os
import pathlib
import selectors
import shlex
import signal
import struct
import subprocess
import sys
import termios
import threading

import pexpect
import pytest

from commander_pam_plugin.progress import ProgressIndicator
from commander_pam_plugin.terminal import (
    Escape,
    EscapeFilter,
    TerminalRunner,
    is_interactive,
    terminal_size,
)

TIMEOUT = 10  # safety net only; every wait below ends on an event
PROMPT = "remote[$] "
PEER_LOST = "peer connection lost"


def _set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_controlling_tty() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # so the remote pty delivers SIGWINCH to sh


class LocalShellRemote:
    """A RemoteEnd backed by a real /bin/sh: in its own pty, or on pipes for pipe mode.

    With end_as_error the shell's end is reported as a lost peer instead of an exit status.
    """

    def __init__(self, use_pty: bool, end_as_error: bool = False) -> None:
        self._use_pty = use_pty
        self._end_as_error = end_as_error
        self._write_lock = threading.Lock()
        self.closed = False
        self.eofs = 0
        self.sizes: list[tuple[int, int]] = []
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PS1": "remote$ ", "ENV": ""}
        if use_pty:
            master, slave = os.openpty()
            _set_winsize(master, *terminal_size(0))
            self._proc = subprocess.Popen(
                ["/bin/sh", "-i"], stdin=slave, stdout=slave, stderr=slave, env=env,
                start_new_session=True, preexec_fn=_take_controlling_tty,
            )
            os.close(slave)
            self._in_fd = self._out_fd = master
        else:
            self._proc = subprocess.Popen(
                ["/bin/sh"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, env=env,
            )
            assert self._proc.stdin is not None and self._proc.stdout is not None
            self._in_fd, self._out_fd = self._proc.stdin.fileno(), self._proc.stdout.fileno()
        self._thread: threading.Thread | None = None

    def start(self, runner: TerminalRunner) -> None:
        self._thread = threading.Thread(target=self._pump, args=(runner,), daemon=True)
        self._thread.start()

    def _pump(self, runner: TerminalRunner) -> None:
        while True:
            try:
                data = os.read(self._out_fd, 65536)
            except OSError:  # EIO: the pty's last writer is gone
                data = b""
            if not data:
                break
            runner.feed_output(data)
        status = self._proc.wait()
        if self._end_as_error:
            runner.feed_error(PEER_LOST)
        else:
            runner.feed_exit(status if status >= 0 else 128 - status)

    def join(self) -> None:
        assert self._thread is not None
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), f"remote thread still running after {TIMEOUT} s"

    def send(self, data: bytes) -> None:
        with self._write_lock:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._in_fd, view):]
            except OSError:  # the shell is gone; its end is reported by the pump
                pass

    def send_eof(self) -> None:
        self.eofs += 1
        if self._use_pty:
            self.send(b"\x04")
        else:
            assert self._proc.stdin is not None
            self._proc.stdin.close()

    def resize(self, cols: int, rows: int) -> None:
        self.sizes.append((cols, rows))
        if self._use_pty:
            _set_winsize(self._in_fd, cols, rows)

    def close(self) -> None:
        self.closed = True
        self._proc.kill()


# -- the program under test (this file run as a script) --------------------------------


def _handshake(line: str) -> None:
    """Tell the test where we are and wait for its go-ahead (a cooked-mode line)."""
    os.write(1, (line + "\r\n").encode())
    os.read(0, 1024)


def _child_main(argv: list[str]) -> int:
    interactive = is_interactive(0)
    remote = LocalShellRemote(use_pty=interactive, end_as_error="error" in argv)
    runner = TerminalRunner(remote)
    remote.start(runner)
    if interactive:
        _handshake("child-ready")
    try:
        status = runner.run()
    except KeyboardInterrupt:  # what a host shell would do with it
        status = 130
    if interactive:
        _handshake(f"child-status={status} remote-closed={remote.closed}")
    return status


# -- tests in a real pseudo-terminal ------------------------------------------------------


class Session:
    """This file's program in a pexpect pty, with the outer terminal's modes checked."""

    def __init__(self, *args: str, resize_before_run: tuple[int, int] | None = None) -> None:
        self.child = pexpect.spawn(
            sys.executable, [__file__, *args], dimensions=(24, 80), timeout=TIMEOUT
        )
        self.child.expect("child-ready")  # the remote is open at 80x24 now
        self.modes_before = termios.tcgetattr(self.child.child_fd)
        if resize_before_run is not None:
            self.child.setwinsize(*resize_before_run)
        self.child.sendline("go")
        self.child.expect(PROMPT)
        self.modes_during = termios.tcgetattr(self.child.child_fd)

    def type(self, text: str) -> None:
        self.child.send(text)

    def finish(self) -> tuple[int, bool, int]:
        """(status run() returned, whether the remote was closed, the process exit status)."""
        self.child.expect(r"child-status=(\d+) remote-closed=(\w+)")
        status, closed = int(self.child.match.group(1)), self.child.match.group(2) == b"True"
        self.modes_after = termios.tcgetattr(self.child.child_fd)
        self.child.sendline("go")
        self.child.expect(pexpect.EOF)
        self.child.close()
        return status, closed, self.child.exitstatus


def test_typed_command_output_and_exit_status_and_modes_restored() -> None:
    session = Session()
    assert session.modes_during != session.modes_before  # raw mode while the session runs
    session.type("echo $((6*7))\r")
    session.child.expect("\r\n42\r\n")
    session.type("exit 3\r")
    assert session.finish() == (3, True, 3)
    assert session.modes_after == session.modes_before


def test_resizing_the_outer_pty_shows_in_remote_stty_size() -> None:
    session = Session()
    session.child.setwinsize(40, 100)
    session.type("stty size\r")
    session.child.expect("\r\n40 100\r\n")
    session.child.setwinsize(30, 90)
    session.type("stty size\r")
    session.child.expect("\r\n30 90\r\n")
    session.type("exit\r")
    assert session.finish() == (0, True, 0)


def test_a_resize_between_session_open_and_run_is_not_lost() -> None:
    session = Session(resize_before_run=(33, 77))
    session.type("stty size\r")
    session.child.expect("\r\n33 77\r\n")
    session.type("exit\r")
    assert session.finish() == (0, True, 0)


def test_escape_dot_after_newline_disconnects_with_255() -> None:
    session = Session()
    session.type("~?")  # the session starts at a line start
    session.child.expect("terminate connection")
    session.type("echo one\r")
    session.child.expect("\r\none\r\n" + PROMPT)
    session.type("~.")
    # On a line of its own, though the remote left the cursor after its prompt.
    session.child.expect_exact("\r\nConnection to remote closed.\r\n")
    assert session.child.before == b""
    assert session.finish() == (255, True, 255)
    assert session.modes_after == session.modes_before


def test_peer_loss_reports_one_line_and_restores_modes() -> None:
    session = Session("error")
    session.type("exit 7\r")
    session.child.expect(f"\r\nerror: {PEER_LOST}\r\n")
    assert session.finish() == (255, True, 255)
    assert session.modes_after == session.modes_before


def test_an_interrupt_still_restores_modes_and_closes_the_remote() -> None:
    session = Session()
    os.kill(session.child.pid, signal.SIGINT)  # raw mode: only a signal from outside can do it
    assert session.finish() == (130, True, 130)
    assert session.modes_after == session.modes_before


# -- pipe mode ----------------------------------------------------------------------------


def _program() -> str:
    return f"{shlex.quote(sys.executable)} {shlex.quote(__file__)}"


def test_pipe_mode_prints_output_and_returns_remote_status() -> None:
    done = subprocess.run(
        f"printf 'echo hi; exit 4\\n' | {_program()}",
        shell=True, capture_output=True, timeout=TIMEOUT,
    )
    assert (done.returncode, done.stdout, done.stderr) == (4, b"hi\n", b"")


def test_pipe_mode_ends_quietly_when_stdout_closes() -> None:
    proc = subprocess.Popen(
        [sys.executable, __file__],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(b"while :; do echo y; done\n")
    proc.stdin.close()
    assert proc.stdout.readline() == b"y\n"
    proc.stdout.close()
    assert proc.wait(TIMEOUT) == 141
    assert proc.stderr.read() == b""


def _run_with_deadline(runner: TerminalRunner, remote: LocalShellRemote) -> int:
    """runner.run() (pipe mode needs no main thread) with a safety net against a hang."""
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(runner.run()), daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    if thread.is_alive():
        remote.close()  # ends the shell, so the runner and its thread end too
        pytest.fail("run() did not return")
    return result[0]


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count fds")
def test_pipe_mode_in_process_keeps_order_eof_once_and_leaks_nothing() -> None:
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    os.write(stdin_w, b"trap 'exit 5' EXIT; echo $((6*7))\n")  # ends only at our EOF
    os.close(stdin_w)
    remote = LocalShellRemote(use_pty=False)
    fds_before = _open_fds()
    runner = TerminalRunner(remote, stdin_fd=stdin_r, stdout_fd=stdout_w, stderr=io.StringIO())
    runner_fds = _open_fds() - fds_before
    assert len(runner_fds) == 2  # its wake pipe
    runner.feed_output(b"early\n")  # fed before run(): kept, and first
    remote.start(runner)
    assert _run_with_deadline(runner, remote) == 5
    remote.join()
    runner.feed_output(b"late\n")  # after run(): ignored, never written to a reused fd
    assert runner_fds.isdisjoint(_open_fds())
    assert (remote.eofs, remote.closed, remote.sizes) == (1, True, [])
    os.close(stdout_w)
    with os.fdopen(stdout_r, "rb") as out:
        assert out.read() == b"early\n42\n"
    os.close(stdin_r)


def test_feed_error_with_stdin_from_a_file_is_one_line_and_255(tmp_path: pathlib.Path) -> None:
    script = tmp_path / "script.sh"  # a regular file: epoll would refuse to watch it
    script.write_bytes(b"exit 0\n")
    stderr = io.StringIO()
    remote = LocalShellRemote(use_pty=False, end_as_error=True)
    with open(script, "rb") as stdin, open(os.devnull, "wb") as devnull:
        runner = TerminalRunner(
            remote, stdin_fd=stdin.fileno(), stdout_fd=devnull.fileno(), stderr=stderr
        )
        remote.start(runner)
        assert _run_with_deadline(runner, remote) == 255
    assert stderr.getvalue() == f"error: {PEER_LOST}\n"


# -- narrow units -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ([b"~."], [Escape.DISCONNECT]),
        ([b"ls\r~.rest"], [b"ls\r", Escape.DISCONNECT]),
        ([b"ls\n~."], [b"ls\n", Escape.DISCONNECT]),
        ([b"a~."], [b"a~."]),  # not at line start
        ([b"~~"], [b"~"]),
        ([b"~~~."], [b"~~."]),  # after "~~" the line has started
        ([b"~x"], [b"~x"]),
        ([b"~\r~."], [b"~\r", Escape.DISCONNECT]),
        ([b"~?~."], [Escape.HELP, Escape.DISCONNECT]),
        ([b"\r~", b"."], [b"\r", Escape.DISCONNECT]),  # split across reads
        ([b"x\r", b"~", b"~"], [b"x\r", b"~"]),
        ([b"\x03\r"], [b"\x03\r"]),
    ],
)
def test_escape_filter_decisions(typed: list[bytes], expected: list[object]) -> None:
    escapes = EscapeFilter("~")
    got: list[object] = []
    for chunk in typed:
        got.extend(escapes.feed(chunk))
    assert got == expected


def test_escape_filter_other_char_and_bad_char() -> None:
    assert EscapeFilter("%").feed(b"~.%.") == [b"~.%."]
    assert EscapeFilter("%").feed(b"%.") == [Escape.DISCONNECT]
    with pytest.raises(ValueError):
        EscapeFilter("~~")


def test_terminal_size_reads_clamps_and_falls_back() -> None:
    master, slave = os.openpty()
    try:
        _set_winsize(master, 132, 43)
        assert terminal_size(slave) == (132, 43)
        _set_winsize(master, 5000, 2)
        assert terminal_size(slave) == (1000, 2)
        _set_winsize(master, 0, 0)
        assert terminal_size(slave) == (80, 24)
    finally:
        os.close(master)
        os.close(slave)
    read_end, write_end = os.pipe()
    try:
        assert terminal_size(read_end) == (80, 24)
        assert not is_interactive(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)


# -- progress indicator -------------------------------------------------------------------


def test_progress_writes_nothing_off_a_terminal() -> None:
    stream = io.StringIO()
    progress = ProgressIndicator(stream)
    progress.phase("signaling")
    progress.clear()
    assert stream.getvalue() == ""


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while len(data) < size and selector.select(TIMEOUT):
            data += os.read(fd, size - len(data))
        assert not selector.select(0), "more bytes than expected"
    return data


def test_progress_rewrites_one_line_and_clears_it_on_a_terminal() -> None:
    master, slave = os.openpty()
    _set_winsize(master, 30, 24)
    with open(slave, "w") as stream:
        progress = ProgressIndicator(stream)
        progress.phase("signaling")
        progress.phase("ice and dtls handshake")  # wider than the terminal: cut, never wrapped
        progress.clear()
        progress.phase("late")  # after clear(): must not land in remote output
        stream.write("$")
        stream.flush()
        expected = (
            "\rconnecting: signaling...\x1b[K"
            "\rconnecting: ice and dtls hand\x1b[K"
            "\r\x1b[K"
            "$"
        ).encode()
        got = _read_exactly(master, len(expected))
    os.close(master)
    assert got == expected


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
