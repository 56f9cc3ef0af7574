"""pam launch end to end: a real pseudo-terminal, the real shell, router, gateway, aiortc peers and an
asyncssh server whose password only the gateway holds (127.0.0.1 only)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from client_support import GatewayProcess
from commander_pam_plugin.gateway.embedded import EmbeddedGateway
from gateway_support import demo_ssh_server, free_port, make_config, ssh_resource

SHELL = f"{sys.executable} -m commander_pam_plugin.shell"
MARK = "PAM-TEST-MARK"


@pytest.fixture(scope="module")
def ssh_server():
    with demo_ssh_server() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(ssh_server) -> EmbeddedGateway:
    resources = [ssh_resource(ssh_server, "box"), {"name": "web", "kind": "tcp", "host": "127.0.0.1", "port": 9},
                 {"name": "dead", "kind": "ssh", "host": "127.0.0.1", "port": free_port(), "username": "nobody",
                  "password": "never-used-secret", "insecure_skip_host_key_check": True}]
    with EmbeddedGateway(make_config(resources)) as gw:
        yield gw


def _env(tmp_path: Path, gateway=None, **extra: str) -> dict[str, str]:
    """A clean user environment: own HOME (no stray config), router settings only when given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAM_")}
    env.update(HOME=str(tmp_path), TERM="xterm-256color", **extra)
    if gateway is not None:
        env.update(PAM_ROUTER_URL=gateway.router_url, PAM_TOKEN=gateway.user_token("alice"))
    return env


def _spawn(command: str, env: dict[str, str], rows: int = 24, cols: int = 80) -> pexpect.spawn:
    """The command inside `sh`, which prints the terminal modes before and after it, and its status."""
    script = f"stty -g; {command}; echo EXIT=$?; stty -g"
    return pexpect.spawn("/bin/sh", ["-c", script], env=env, dimensions=(rows, cols), encoding="utf-8",
                         timeout=30)


def _run_remote(child: pexpect.spawn, command: str) -> str:
    """Type a command on the remote shell; return what it printed between two markers."""
    child.sendline(f"echo {MARK}-A; {command}; echo {MARK}-B")
    child.expect(f"[\r\n]{MARK}-A\r\n")  # output lines start after \r (bash's bracketed paste) or \n
    child.expect(f"{MARK}-B\r\n")  # after A's output: the typed echo of B is behind us
    return child.before


def test_interactive_session_command_resize_exit_status_and_restored_modes(gateway, ssh_server,
                                                                           tmp_path: Path) -> None:
    child = _spawn(f"{SHELL} pam launch box", _env(tmp_path, gateway), rows=30, cols=100)
    child.expect(r"(\S+)\r\n")
    modes_before = child.match.group(1)
    assert _run_remote(child, "echo $((6*7))").strip() == "42"
    assert _run_remote(child, "stty size").strip() == "30 100"
    child.setwinsize(40, 132)
    assert _run_remote(child, "stty size").strip() == "40 132"
    child.sendline("exit 3")
    child.expect(r"EXIT=(\d+)\r\n(\S+)")
    transcript = child.before + child.after
    assert child.match.group(1) == "3"
    assert child.match.group(2) == modes_before  # raw mode undone
    child.expect(pexpect.EOF)
    assert ssh_server.password not in transcript


def test_ready_line_and_timing_table_and_no_secret_in_output(gateway, ssh_server, tmp_path: Path) -> None:
    child = _spawn(f"{SHELL} pam launch box --timing", _env(tmp_path, gateway, PAM_CONNECT_TIMING="1"))
    output = _run_remote(child, "echo hello")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    whole = output + child.before
    assert "ready_for_prompt" in whole and "pam-launch:webrtc-tunnel" in whole
    assert ssh_server.password not in whole and gateway.user_token("alice") not in whole


def test_pipe_mode_with_the_embedded_default(tmp_path: Path) -> None:
    """No router configured: the README's demo, in pipe mode (stdin is not a terminal)."""
    result = subprocess.run([sys.executable, "-m", "commander_pam_plugin.shell", "pam", "launch", "demo"],
                            input="echo hi; exit 4\n", env=_env(tmp_path), capture_output=True, text=True,
                            timeout=60)
    assert result.stdout == "hi\n"
    assert result.returncode == 4
    assert "started a local router and gateway" in result.stderr
    assert result.stderr.count("\n") == 1  # one line says what it started; nothing else


def test_readme_first_command_reaches_a_working_remote_prompt(tmp_path: Path) -> None:
    child = _spawn(f"{SHELL} pam launch demo", _env(tmp_path))
    assert _run_remote(child, "echo $((40+2))").strip() == "42"
    child.sendline("exit 0")
    child.expect(r"EXIT=(\d+)")
    assert child.match.group(1) == "0"


def test_command_option_runs_one_command_and_returns_its_status(gateway, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "commander_pam_plugin.shell", "pam", "launch", "box",
                             "--command", "echo via-command; exit 5"], stdin=subprocess.DEVNULL,
                            env=_env(tmp_path, gateway), capture_output=True, text=True, timeout=60)
    assert result.stdout == "via-command\n" and result.returncode == 5, result.stderr


def test_escape_disconnects_with_255(gateway, tmp_path: Path) -> None:
    child = _spawn(f"{SHELL} pam launch box", _env(tmp_path, gateway))
    _run_remote(child, "true")
    child.send("\r~.")
    child.expect(r"EXIT=(\d+)")
    assert child.match.group(1) == "255"


@pytest.mark.parametrize("resource, message", [
    ("dead", "dead"),  # the gateway cannot reach the SSH target
    ("web", "pam launch opens ssh resources"),
    ("nosuch", "resources you may use: box, dead, web"),
])
def test_failures_are_one_clear_line_and_non_zero(gateway, tmp_path: Path, resource: str, message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "commander_pam_plugin.shell", "pam", "launch", resource],
                            stdin=subprocess.DEVNULL, env=_env(tmp_path, gateway), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "never-used-secret" not in result.stderr + result.stdout


def test_lost_gateway_ends_the_session_with_one_line(ssh_server, tmp_path: Path) -> None:
    """With resume off for the resource (grace 0), a lost peer ends the session at once, as before
    resume existed (test_launch_resume.py covers the held sessions)."""
    gateway = GatewayProcess(make_config([ssh_resource(ssh_server, "box", resume_grace_s=0)]), tmp_path)
    try:
        env = _env(tmp_path, PAM_ROUTER_URL=gateway.router_url, PAM_TOKEN=gateway.user_token("alice"))
        child = _spawn(f"{SHELL} pam launch box", env)
        _run_remote(child, "true")
        gateway.kill()
        child.expect(r"error: connection to the gateway lost[^\r\n]*\r\n", timeout=15)
        child.expect(r"EXIT=(\d+)")
        assert child.match.group(1) == "255"
    finally:
        gateway.stop()
