"""Talking to the agent from a shell process, and starting it on demand (like ControlPersist)."""
from __future__ import annotations

import fcntl
import json
import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import PamError
from . import paths, wire
from .creds import peer_uid

START_TIMEOUT_S = 30.0  # the agent imports aiortc and, with no router configured, starts one
REQUEST_TIMEOUT_S = 120.0  # a start request waits for the connect (its own timeout is lower)


def _connect(path: Path) -> socket.socket | None:
    """A connection to our own agent, or None when none listens. An agent of another uid (a
    socket someone else planted on the path) is refused before a byte is sent to it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        owner = peer_uid(sock)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError as exc:
        sock.close()
        raise PamError(f"cannot reach the pam agent at {path}: {exc.strerror or exc}") from None
    if owner != os.getuid():
        sock.close()
        raise PamError(f"the socket {path} belongs to another user's process; remove it")
    return sock


def request(message: dict[str, Any], *, start: bool = False, path: Path | None = None) -> dict[str, Any] | None:
    """Send one request and return the answer; None when no agent runs and start is False."""
    path = path or paths.socket_path()
    sock = _connect(path)
    if sock is None:
        if not start:
            return None
        sock = _start_agent(path)
    with sock:
        sock.settimeout(REQUEST_TIMEOUT_S)
        sock.sendall(wire.encode(message))
        line = sock.makefile("rb").readline(wire.MAX_LINE + 1)
    if not line:
        raise PamError("the pam agent closed the connection without an answer")
    try:
        answer = json.loads(line)
    except json.JSONDecodeError:
        raise PamError("the pam agent answered something that is not JSON") from None
    if not answer.get("ok"):
        raise PamError(str(answer.get("error") or "the pam agent refused the request"))
    return answer


def _start_agent(path: Path) -> socket.socket:
    """Under a lock (two shells starting at once start one agent), start it and connect."""
    paths.ensure_private_dir(path.parent)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _connect(path)  # another shell may have started it while we waited
        if sock is not None:
            return sock
        _spawn(path)
        sock = _connect(path)
    if sock is None:
        raise PamError(f"the pam agent started but its socket {path} is not there")
    return sock


def _spawn(path: Path) -> None:
    """Run the agent detached; wait for its 'ready' line on a pipe (no polling, no sleep)."""
    read_fd, write_fd = os.pipe()
    log_path = path.with_name(path.name + ".log")
    try:
        with open(log_path, "ab") as log_file:
            os.chmod(log_path, 0o600)
            starter = subprocess.Popen(
                [sys.executable, "-m", "commander_pam_plugin.agent", "--socket", str(path),
                 "--ready-fd", str(write_fd), "--detach"],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, pass_fds=(write_fd,),
                close_fds=True)
        os.close(write_fd)
        write_fd = -1
        starter.wait(timeout=START_TIMEOUT_S)  # the intermediate exits right after its fork
        line = _read_line(read_fd, START_TIMEOUT_S)
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        os.close(read_fd)
    if not line.startswith("ready"):
        raise PamError(f"the pam agent did not start; see {log_path}")


def _read_line(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                break
            chunk = os.read(fd, 256)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace")
