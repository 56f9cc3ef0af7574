"""Helpers for agent tests: a per-test socket path, shells in subprocesses, and an agent reaper.

Every agent a test starts is stopped by the test: the fixture asks it to exit and waits for
its pid (pidfd) to end, and kills it if it does not.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from commander_pam_plugin.agent import client

SHELL = str(Path(sys.executable).with_name("commander-shell"))


def shell_env(tmp_path: Path, sock: Path, gateway: Any = None, user: str = "alice", **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAM_")}
    env.update(HOME=str(tmp_path), PAM_AGENT_SOCKET=str(sock), **extra)
    if gateway is not None:
        env.update(PAM_ROUTER_URL=gateway.router_url, PAM_TOKEN=gateway.user_token(user))
    return env


def run_shell(env: dict[str, str], *lines: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    argv = [SHELL]
    for line in lines:
        argv += ["-c", line]
    return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def wait_pid_gone(pid: int, timeout: float) -> bool:
    """Wait on the process's pidfd (no polling); True if it ended in time."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def stop_agent(sock: Path) -> None:
    """Ask the agent on `sock` to exit and wait for it; kill it if it lingers."""
    try:
        answer = client.request({"op": "ping"}, path=sock)
    except Exception:
        return
    if answer is None:
        return
    pid = int(answer["pid"])
    try:
        client.request({"op": "exit"}, path=sock)
    except Exception:
        pass
    if not wait_pid_gone(pid, 20):
        os.kill(pid, signal.SIGKILL)
        wait_pid_gone(pid, 5)
        pytest.fail(f"agent {pid} did not exit when asked")


@pytest.fixture
def agent_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    sock = directory / "agent.sock"
    monkeypatch.setenv("PAM_AGENT_SOCKET", str(sock))
    yield sock
    stop_agent(sock)


def last_json(text: str) -> Any:
    return json.loads(text.strip().splitlines()[-1])
