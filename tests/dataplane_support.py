"""Helpers for the data-plane tests: real TCP targets with chosen behaviours, a gateway process
with its own descriptor limit, and memory readings. Nothing here is a mock.

`ModeTarget` is one TCP target whose connections pick a behaviour with their first byte, so
several streams of one tunnel (one resource) can behave differently at once:
  b"S" slow reader (64 KiB/s), b"Q" silent (accepts, never reads), b"E" echo,
  b"D" download source (sends `DOWNLOAD_BYTES` as fast as the connection takes them),
  b"R" reads one block, then resets the connection.
"""
from __future__ import annotations

import hashlib
import os
import resource
import socket
import threading
import time
from pathlib import Path
from typing import Any

from client_support import GatewayProcess

SLOW_RATE = 64 * 1024  # bytes per second
OFFERED = 200 * 1024 * 1024  # what a sender offers in the back-pressure tests
DOWNLOAD_BYTES = OFFERED
BLOCK = 64 * 1024
_PATTERN = hashlib.sha256(b"dataplane").digest() * (BLOCK // 32)


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class ModeTarget:
    """TCP target on 127.0.0.1 in daemon threads; counts what each behaviour moved."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        # small fixed receive buffers (inherited by accepted sockets): the kernel then absorbs
        # little of what a silent or slow connection is sent, so the product's bounds show
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.slow_read = 0  # bytes the slow reader took
        self.download_sent = 0  # bytes the download source handed to the kernel
        self.held: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            mode = conn.recv(1)
            if mode == b"S":
                self._slow(conn)
            elif mode == b"Q":
                self.held.append(conn)  # silent: never read, never close
                return
            elif mode == b"E":
                while data := conn.recv(BLOCK):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            elif mode == b"D":
                self._download(conn)
            elif mode == b"R":
                reset_after_first_block(conn)
        except OSError:
            pass
        conn.close()

    def _slow(self, conn: socket.socket) -> None:
        """Read at SLOW_RATE: the pacing is the behaviour under test (a slow consumer)."""
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        start = time.monotonic()
        while not self._stop.is_set():
            due = start + self.slow_read / SLOW_RATE
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            data = conn.recv(16 * 1024)
            if not data:
                return
            self.slow_read += len(data)

    def _download(self, conn: socket.socket) -> None:
        while self.download_sent < DOWNLOAD_BYTES and not self._stop.is_set():
            self.download_sent += conn.send(_PATTERN)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for conn in self.held:
            conn.close()


class Sender:
    """A local application writing `OFFERED` bytes to a tunnel as fast as the socket takes them."""

    def __init__(self, port: int, mode: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        self.sock.sendall(mode)
        self.sent = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(None)
        try:
            while self.sent < OFFERED:
                self.sent += self.sock.send(_PATTERN)
        except OSError as exc:
            self.error = exc

    def close(self) -> None:
        self.sock.close()


class SlowReader:
    """A local application reading a tunnel at SLOW_RATE."""

    def __init__(self, port: int, mode: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.sock.sendall(mode)
        self.read = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        try:
            while not self._stop.is_set():
                delay = start + self.read / SLOW_RATE - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                data = self.sock.recv(16 * 1024)
                if not data:
                    return
                self.read += len(data)
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


def flatten_limits(config: dict[str, Any]) -> dict[str, Any]:
    """[gateway.limits] as dotted keys inside [gateway], which to_toml can write."""
    gateway = config["gateway"]
    for key, value in gateway.pop("limits", {}).items():
        gateway[f"limits.{key}"] = value
    return config


class LimitedGateway(GatewayProcess):
    """`pam-gateway serve` in its own process with RLIMIT_NOFILE set to `nofile` (like `ulimit -n`)."""

    def __init__(self, config: dict[str, Any], tmp_path: Path, nofile: int | None = None) -> None:
        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        super().__init__(flatten_limits(config), tmp_path, preexec_fn=limit, online_line="descriptor limit")

    def rss(self) -> int:
        return rss_bytes(self.process.pid)

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))


def reset_after_first_block(conn: socket.socket) -> None:
    """Target behaviour b"R": read one block, then reset the connection (SO_LINGER 0)."""
    import struct

    conn.recv(BLOCK)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
