"""The per-user agent: a background tunnel outlives the shell that started it, and every later
shell process of the user lists, uses and stops it. Real router, gateway, aiortc peers and TCP."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from agent_support import agent_socket, last_json, run_shell, shell_env, stop_agent, wait_pid_gone  # noqa: F401
from client_support import echo_roundtrip, payload
from commander_pam_plugin.agent import client
from commander_pam_plugin.gateway.embedded import EmbeddedGateway
from gateway_support import EchoServer, make_config


@pytest.fixture
def echo() -> EchoServer:
    with EchoServer() as server:
        yield server


@pytest.fixture
def gateway(echo: EchoServer) -> EmbeddedGateway:
    config = make_config([{"name": "db", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}])
    with EmbeddedGateway(config) as gw:
        yield gw


def test_background_tunnel_is_seen_used_and_stopped_by_other_processes(gateway, agent_socket: Path,
                                                                         tmp_path: Path) -> None:
    env = shell_env(tmp_path, agent_socket, gateway)
    pid_file = tmp_path / "tunnel.pid"
    started = run_shell(env, f"pam tunnel start db --background --json --pid-file {pid_file}")
    assert started.returncode == 0, started.stderr
    record = last_json(started.stdout)
    assert record["state"] == "up" and record["id"].startswith("a")
    assert int(pid_file.read_text()) == record["agent_pid"]
    assert agent_socket.stat().st_mode & 0o777 == 0o600

    data = payload(1 << 20, seed=13)
    assert hashlib.sha256(echo_roundtrip(record["port"], data)).digest() == hashlib.sha256(data).digest()

    listed = run_shell(env, "pam tunnel list --json")
    assert listed.returncode == 0, listed.stderr
    [seen] = last_json(listed.stdout)
    assert (seen["id"], seen["port"]) == (record["id"], record["port"])
    assert seen["bytes_out"] == len(data) and seen["bytes_in"] == len(data)

    stopped = run_shell(env, f"pam tunnel stop {record['id']}")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped 1 tunnel" in stopped.stdout
    assert last_json(run_shell(env, "pam tunnel list --json").stdout) == []


def test_a_chain_returns_after_a_background_start_and_stops_by_resource(gateway, agent_socket: Path,
                                                                       tmp_path: Path) -> None:
    env = shell_env(tmp_path, agent_socket, gateway)
    result = run_shell(env, "pam tunnel start db --background", "pam tunnel list", "pam tunnel stop db",
                       "pam tunnel list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("tunnel a1: 127.0.0.1:") and "in the background" in lines[0]
    assert any(line.startswith("a1 ") and " up " in line for line in lines)
    assert "stopped 1 tunnel" in result.stdout and lines[-1] == "no tunnels"


def test_the_agent_exits_when_idle_with_no_tunnel(gateway, agent_socket: Path, tmp_path: Path) -> None:
    env = shell_env(tmp_path, agent_socket, gateway, PAM_AGENT_IDLE_S="0.5")
    started = run_shell(env, "pam tunnel start db --background --json", "pam tunnel stop --all")
    assert started.returncode == 0, started.stderr
    pid = last_json(started.stdout.splitlines()[0])["agent_pid"]
    assert wait_pid_gone(pid, 20), "the agent did not exit after its idle time"
    assert not agent_socket.exists()


def test_bad_requests_are_refused_in_one_line(gateway, agent_socket: Path, tmp_path: Path) -> None:
    env = shell_env(tmp_path, agent_socket, gateway)
    refused = run_shell(env, "pam tunnel start no/such --background")
    assert refused.returncode != 0 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1
    unknown = run_shell(env, "pam tunnel start nosuch --background")
    assert unknown.returncode != 0 and len(unknown.stderr.strip().splitlines()) == 1, unknown.stderr
    assert gateway.user_token("alice") not in unknown.stderr
    import socket as socket_module
    for line in (b"not json\n", b'{"op": "launch-missiles"}\n', b"[1]\n", b'{"op": "start", "resource": 5}\n'):
        with socket_module.socket(socket_module.AF_UNIX) as sock:
            sock.connect(str(agent_socket))
            sock.sendall(line)
            answer = sock.makefile("rb").readline()
        assert answer.count(b"\n") == 1 and b'"ok":false' in answer, answer
    assert client.request({"op": "ping"}, path=agent_socket)["ok"]


def test_the_embedded_default_lives_in_the_agent_and_the_prompt_sees_its_tunnels(agent_socket: Path, tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    env = shell_env(tmp_path, agent_socket)  # no router configured: the agent starts the embedded one
    started = run_shell(env, "pam tunnel start demo-echo --background --json")
    assert started.returncode == 0, started.stderr
    record = last_json(started.stdout)
    assert echo_roundtrip(record["port"], b"embedded") == b"embedded"

    from client_support import ShellSession
    for name in [k for k in env if k.startswith("PAM_") and k != "PAM_AGENT_SOCKET"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with ShellSession(interactive=True) as prompt:
        status, out, err = prompt.run("pam tunnel list --json")
        assert status == 0, err
        assert [t["id"] for t in last_json(out)] == [record["id"]]
        status, out, err = prompt.run("pam tunnel stop --all")
        assert status == 0 and "stopped 1 tunnel" in out, (out, err)


def test_a_foreground_tunnel_in_a_chain_says_it_holds_the_chain(gateway, agent_socket: Path, tmp_path: Path) -> None:
    import signal
    import subprocess

    from agent_support import SHELL
    env = shell_env(tmp_path, agent_socket, gateway)
    proc = subprocess.Popen([SHELL, "-c", "pam tunnel start db", "-c", "pam tunnel list"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = ""
        for line in proc.stderr:
            if "Ctrl-C" in line:
                break
        assert "later -c commands run after it" in line and "--background" in line, line
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
