"""What a new user meets first: the messages of a busy port and of a SIGTERM, through the real shell,
router, gateway and aiortc peers on 127.0.0.1."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from commander_pam_plugin.gateway.embedded import EmbeddedGateway
from gateway_support import EchoServer, make_config

SHELL = [sys.executable, "-m", "commander_pam_plugin.shell"]
WAIT_S = 60.0  # a "does not hang" bound, not a timing claim


@pytest.fixture(scope="module")
def gateway():
    with EchoServer() as echo:
        with EmbeddedGateway(make_config([{"name": "echo", "kind": "tcp", "host": "127.0.0.1",
                                           "port": echo.port}])) as gw:
            yield gw


def _env(gateway, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAM_")}
    env.update(HOME=str(tmp_path), PAM_ROUTER_URL=gateway.router_url, PAM_TOKEN=gateway.user_token("alice"))
    return env


def test_a_busy_local_port_is_said_once(gateway, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([*SHELL, "pam", "tunnel", "start", "echo", "--port", str(port), "--run", "true"],
                                env=_env(gateway, tmp_path), capture_output=True, text=True, timeout=WAIT_S)
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: cannot listen on 127.0.0.1:{port}: {os.strerror(98)}"


def test_a_one_shot_tunnel_ended_by_sigterm_says_so_and_exits_143(gateway, tmp_path: Path) -> None:
    shell = subprocess.Popen([*SHELL, "pam", "tunnel", "start", "echo"], env=_env(gateway, tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert shell.stderr is not None
        for line in shell.stderr:  # an event (the prompt to press Ctrl-C), not a sleep
            if "press Ctrl-C" in line:
                break
        shell.send_signal(signal.SIGTERM)
        _, err = shell.communicate(timeout=WAIT_S)
    finally:
        if shell.poll() is None:
            shell.kill()
    assert shell.returncode == 128 + signal.SIGTERM
    assert "terminated (SIGTERM)" in err
