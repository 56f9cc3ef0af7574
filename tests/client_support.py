"""Client-side test helpers: an in-process shell session and a real TCP load client.

ShellSession drives the real reference shell (plugins loaded through the entry point, the
real command registry) in this process, so tunnels live across commands the way they do at
the interactive prompt. Nothing here is a mock.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import socket
import threading
from typing import Any

import pytest

from commander_pam_plugin import shell

PAM_ENV = ("PAM_ROUTER_URL", "PAM_TOKEN", "PAM_CONFIG", "PAM_ICE_HOST_ADDRESSES", "PAM_CONNECT_TIMING")


def point_client_at(monkeypatch: pytest.MonkeyPatch, gateway: Any, user: str = "alice",
                    addresses: str | None = None, tmp_path: Any = None) -> None:
    """Environment for a client of `gateway` (an EmbeddedGateway), with an empty config file."""
    for name in PAM_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PAM_ROUTER_URL", gateway.router_url)
    monkeypatch.setenv("PAM_TOKEN", gateway.user_token(user))
    if tmp_path is not None:
        config = tmp_path / "client.toml"
        config.write_text("")
        monkeypatch.setenv("PAM_CONFIG", str(config))
    if addresses:
        monkeypatch.setenv("PAM_ICE_HOST_ADDRESSES", addresses)


class ShellSession:
    """The real shell, in-process: run command lines, read their output, shut down at the end."""

    def __init__(self, interactive: bool = True) -> None:
        self.pm = shell.load_plugins()
        self.out = io.StringIO()
        self.err = io.StringIO()
        self.ctx = shell.CommandContext(hook=self.pm.hook, pm=self.pm, interactive=interactive,
                                        stdout=self.out, stderr=self.err)
        self.registry = shell._start(self.pm, self.ctx)

    def run(self, line: str) -> tuple[int, str, str]:
        start_out, start_err = self.out.tell(), self.err.tell()
        status = shell.run_line(self.ctx, self.registry, line)
        return status, self.out.getvalue()[start_out:], self.err.getvalue()[start_err:]

    def close(self) -> None:
        self.pm.hook.commander_shutdown()

    def __enter__(self) -> "ShellSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class EchoTimeout(AssertionError):
    """The echo did not come back to EOF in time: the test fails (never a short read passed off as done)."""


def echo_roundtrip(port: int, data: bytes, chunk: int = 65536, timeout: float = 60.0) -> bytes:
    """Send `data` through 127.0.0.1:port while reading the echo, half-close, read to EOF.

    Fails (EchoTimeout) if the far side's EOF does not arrive within `timeout`; a reader error
    (a reset) is raised here. The socket is closed only after its reader thread has ended, so
    no thread ever reads a closed descriptor ("Bad file descriptor").
    """
    received = bytearray()
    failure: list[BaseException] = []
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def reader() -> None:
        try:
            while block := sock.recv(chunk):
                received.extend(block)
        except BaseException as exc:  # handed to the test thread below, never swallowed
            failure.append(exc)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    stuck = False
    try:
        view = memoryview(data)
        for start in range(0, len(view), chunk):
            sock.sendall(view[start:start + chunk])
        sock.shutdown(socket.SHUT_WR)
    except socket.timeout:
        _wake(sock)
        raise EchoTimeout(f"127.0.0.1:{port} took nothing for {timeout} s") from None
    except OSError:
        _wake(sock)  # the tunnel ended this connection: let the reader finish before we raise
        raise
    finally:
        thread.join(timeout)
        if thread.is_alive():
            stuck = True
            _wake(sock)
            thread.join(timeout)
        if not thread.is_alive():
            sock.close()
    if stuck or (failure and isinstance(failure[0], socket.timeout)):
        raise EchoTimeout(f"no EOF from 127.0.0.1:{port} within {timeout} s "
                          f"({len(received)} of {len(data)} bytes back)")
    if failure:
        raise failure[0]
    return bytes(received)


def _wake(sock: socket.socket) -> None:
    """Unblock a thread in recv() on `sock` without closing the descriptor under it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def to_toml(config: dict[str, Any]) -> str:
    """Enough TOML for a gateway config dict: tables of scalars and arrays of such tables."""
    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, (int, float)):
            return str(item)
        if isinstance(item, str):
            return '"' + item.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        if isinstance(item, (list, tuple)):
            return "[" + ", ".join(value(x) for x in item) + "]"
        raise TypeError(f"cannot write {item!r} as TOML")

    lines: list[str] = []
    for key, section in config.items():
        if isinstance(section, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {value(v)}" for k, v in section.items() if v is not None]
        else:
            for table in section:
                lines.append(f"[[{key}]]")
                lines += [f"{k} = {value(v)}" for k, v in table.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


class GatewayProcess:
    """`pam-gateway serve` in its own process, so the test process holds only client resources."""

    def __init__(self, config: dict[str, Any], tmp_path: Any, port: int | None = None,
                 preexec_fn: Any = None, online_line: str | None = None) -> None:
        """online_line: the log line that means ready (default: the gateway's "online" line)."""
        import subprocess
        import sys

        self.config = config
        self.port = port or _free_port()
        config.setdefault("router", {})["listen"] = f"127.0.0.1:{self.port}"
        self.path = tmp_path / f"gateway-{self.port}.toml"
        self.path.write_text(to_toml(config))
        self.path.chmod(0o600)
        self.router_url = f"http://127.0.0.1:{self.port}"
        self.gateway_name = config["gateway"]["name"]
        self.log: list[str] = []
        self._online_line = online_line or f"gateway {self.gateway_name} online"
        self.process = subprocess.Popen([sys.executable, "-m", "commander_pam_plugin.gateway", "serve",
                                         "--config", str(self.path)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
        self._online = threading.Event()
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._online.wait(30):
            self.kill()
            raise RuntimeError("gateway process did not come online:\n" + "\n".join(self.log))

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line.rstrip())
            if self._online_line in line:
                self._online.set()

    def user_token(self, name: str) -> str:
        return next(u["token"] for u in self.config["users"] if u["name"] == name)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except Exception:
                self.kill()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
