"""Ctrl-C during a connect returns at once, whatever the router does: here a router that
accepts TCP and never answers (the clean-up must not wait on it again for its close notice)."""
from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from agent_support import SHELL, shell_env


class SilentRouter:
    """Accepts connections and reads requests, never answers; says when a POST arrived."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.posted = threading.Event()
        self._held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._held.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                if b"POST " in data:
                    self.posted.set()
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for conn in self._held:
            conn.close()


def test_ctrl_c_during_a_connect_to_a_silent_router_exits_at_once(tmp_path: Path) -> None:
    router = SilentRouter()
    env = shell_env(tmp_path, tmp_path / "agent.sock", PAM_ROUTER_URL=f"http://127.0.0.1:{router.port}",
                    PAM_TOKEN="t" * 32)
    proc = subprocess.Popen([SHELL, "pam", "tunnel", "start", "db", "--timeout", "60"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert router.posted.wait(30), "the client never sent its offer"
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        elapsed = time.monotonic() - interrupted
    finally:
        proc.kill()
        proc.wait()
        router.close()
    assert proc.returncode != 0
    assert elapsed < 3.0, f"Ctrl-C took {elapsed:.1f} s to take effect"  # a no-hang bound, not a benchmark
