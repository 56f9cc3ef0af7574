"""Shared by every check: the Row, gateway processes, client environments, waits, log capture."""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

from client_support import ShellSession, echo_roundtrip, to_toml
from commander_pam_plugin.config import PamConfig
from commander_pam_plugin.runtime import PamRuntime
from gateway_support import EchoServer


WAIT = 20.0  # safety net for every wait; never a timing claim
RSS_BOUND_MB = 10.0
# The time bounds: checked by main() on the full run, never by the tests (timing claims
# do not belong in tests). Check name -> [(figure holding seconds, bound)].
TIME_BOUNDS = {"fault: gateway killed mid-session": [("tunnel_detect_s", 5.0), ("launch_detect_s", 5.0)],
               "fault: client killed": [("mid-session_freed_s", 10.0), ("mid-negotiation_freed_s", 10.0)]}
SHELL = [sys.executable, "-m", "commander_pam_plugin.shell"]
SESSION_LINE = re.compile(r"conversation (\S+) \(([^,]*), ([^)]*)\) (opened|closed|failed): ")
LOG_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


@dataclass
class Row:
    """One line of the RELIABILITY.md table; `failures` says what was lost, one line each."""

    check: str
    tried: str
    times: int
    survived: str
    lost: int = 0
    failures: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def fail(self, reason: str, count: int = 1) -> None:
        """Record a loss: `count` of the things tried (sessions, transfers...) did not survive."""
        self.lost += count
        self.failures.append(reason)


class Proc:
    """A subprocess whose stdout/stderr lines can be awaited (a condition variable, never a sleep)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, stdin: bool = False) -> None:
        self.proc = subprocess.Popen(argv, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
        self.lines: list[tuple[float, str, str]] = []  # (monotonic arrival, "out"|"err", text)
        self._changed = threading.Condition()
        self._open = 2
        for name, stream in (("out", self.proc.stdout), ("err", self.proc.stderr)):
            threading.Thread(target=self._pump, args=(name, stream), daemon=True).start()

    def _pump(self, name: str, stream: Any) -> None:
        for line in stream:
            with self._changed:
                self.lines.append((time.monotonic(), name, line.rstrip("\n")))
                self._changed.notify_all()
        with self._changed:
            self._open -= 1
            self._changed.notify_all()

    def wait_for(self, pattern: str, since: int = 0, timeout: float = WAIT) -> tuple[int, re.Match[str], float]:
        """The first line from index `since` matching: (index, match, arrival time)."""
        regex, deadline, index = re.compile(pattern), time.monotonic() + timeout, since
        with self._changed:
            while True:
                for index in range(index, len(self.lines)):
                    match = regex.search(self.lines[index][2])
                    if match:
                        return index, match, self.lines[index][0]
                index = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or not self._open:
                    tail = "\n".join(text for _, _, text in self.lines[-8:])
                    raise TimeoutError(f"no line matching {pattern!r} within {timeout:g} s; last lines:\n{tail}")
                self._changed.wait(left)

    def text(self, stream: str = "err") -> str:
        with self._changed:
            return "\n".join(text for _, name, text in self.lines if name == stream)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(WAIT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.kill()

    def status(self, key: str) -> int:
        """A /proc/PID/status figure in kB (VmRSS...)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


class Gateway(Proc):
    """`pam-gateway COMMAND --config FILE` in its own process."""

    def __init__(self, command: str, config_path: Path, *extra: str) -> None:
        super().__init__([sys.executable, "-m", "commander_pam_plugin.gateway", command,
                          "--config", str(config_path), *extra])

    def sessions(self) -> dict[str, str]:
        """conversation id -> its last session log line state (opened, closed or failed)."""
        states: dict[str, str] = {}
        with self._changed:
            for _, _, text in self.lines:
                match = SESSION_LINE.search(text)
                if match:
                    states[match.group(1)] = match.group(4)
        return states

    def live_sessions(self) -> set[str]:
        return {cid for cid, state in self.sessions().items() if state == "opened"}

    def stamps(self, pattern: str, since: int = 0) -> list[float]:
        """The gateway's own log timestamps (seconds) of lines matching, for gaps between them."""
        regex, found = re.compile(pattern), []
        with self._changed:
            for _, _, text in self.lines[since:]:
                stamp = LOG_STAMP.match(text)
                if stamp and regex.search(text):
                    found.append(datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
        return found


def write_config(config: dict[str, Any], folder: Path, name: str) -> Path:
    """The TOML file, created 0600 (it holds tokens; pam-gateway refuses it otherwise)."""
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(to_toml(config))
    return path


def serve(config: dict[str, Any], folder: Path, port: int) -> Gateway:
    """Router and agent in one process on 127.0.0.1:port, returned once the gateway is online."""
    config = copy.deepcopy(config)
    config["router"]["listen"] = f"127.0.0.1:{port}"
    gateway = Gateway("serve", write_config(config, folder, f"serve-{port}.toml"))
    try:
        gateway.wait_for(f"gateway {config['gateway']['name']} online")
    except BaseException:
        gateway.kill()
        raise
    return gateway


def token(config: dict[str, Any], user: str) -> str:
    return next(u["token"] for u in config["users"] if u["name"] == user)


def echo_resource(echo: EchoServer, name: str = "echo") -> dict[str, Any]:
    return {"name": name, "kind": "tcp", "host": "127.0.0.1", "port": echo.port}


def client_env(url: str, user_token: str, folder: Path) -> dict[str, str]:
    """Environment for a plugin client of `url` with an empty config file."""
    config = folder / "client.toml"
    config.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAM_")}
    env.update(PAM_ROUTER_URL=url, PAM_TOKEN=user_token, PAM_CONFIG=str(config))
    return env


@contextlib.contextmanager
def shell_for(url: str, user_token: str, folder: Path) -> Iterator[ShellSession]:
    """The real interactive shell in this process, pointed at `url` (environment restored after)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(client_env(url, user_token, folder))
    try:
        with ShellSession() as session:
            yield session
    finally:
        os.environ.clear()
        os.environ.update(saved)


def runtime(url: str, user_token: str) -> PamRuntime:
    return PamRuntime(PamConfig(router_url=url, token=user_token))


def wait_until(condition: Callable[[], bool], timeout: float = WAIT, every: float = 0.02) -> float:
    """Poll what a user would poll (a command's output); returns when it held (monotonic time)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(every)
    return time.monotonic()


@contextlib.contextmanager
def captured_logs(level: int, loggers: tuple[str, ...] = ()) -> Iterator[list[str]]:
    """Every log record at `level` or above, formatted with its traceback; `loggers` are opened up too."""
    records: list[str] = []
    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(formatter.format(record))

    handler, root = Keep(level), logging.getLogger()
    saved = {name: logging.getLogger(name).level for name in ("", *loggers)}
    root.addHandler(handler)
    for name in ("", *loggers):
        logging.getLogger(name).setLevel(min(level, logging.getLogger(name).level or level))
    try:
        yield records
    finally:
        root.removeHandler(handler)
        for name, old in saved.items():
            logging.getLogger(name).setLevel(old)


def ended(port: int, data: bytes = b"hello") -> bytes:
    """Send through a tunnel port and read to the end; a connection the tunnel closed or reset gives b""."""
    try:
        return echo_roundtrip(port, data)
    except OSError:
        return b""
