"""Tunnels that heal: kill -9 the gateway process under a background tunnel, start it again;
the agent keeps the local port, says `reconnecting`, and is `open` again by itself."""
from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest

from agent_support import agent_socket, last_json, run_shell, shell_env  # noqa: F401
from client_support import GatewayProcess, echo_roundtrip, payload
from commander_pam_plugin.agent import client
from commander_pam_plugin.agent.healing import backoff_delay, is_permanent
from commander_pam_plugin.negotiation import RouterRefusal
from gateway_support import EchoServer, make_config


def _wait(sock: Path, tunnel_id: str, state: str, timeout: float = 90) -> dict:
    answer = client.request({"op": "wait", "id": tunnel_id, "state": state, "timeout": timeout}, path=sock)
    assert answer["reached"], f"tunnel never reached {state}: {answer['tunnel']}"
    return answer["tunnel"]


def test_a_killed_and_restarted_gateway_heals_the_tunnel_on_the_same_port(agent_socket: Path,
                                                                           tmp_path: Path) -> None:
    with EchoServer() as echo:
        config = make_config([{"name": "db", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}],
                             host_addresses=["127.0.0.1"], ice_servers=[])
        gateway = GatewayProcess(config, tmp_path)
        try:
            env = shell_env(tmp_path, agent_socket, PAM_ROUTER_URL=gateway.router_url,
                            PAM_TOKEN=gateway.user_token("alice"))
            started = run_shell(env, "pam tunnel start db --background --json")
            assert started.returncode == 0, started.stderr
            record = last_json(started.stdout)
            assert echo_roundtrip(record["port"], b"before") == b"before"

            held = socket.create_connection(("127.0.0.1", record["port"]), timeout=60)
            held.sendall(b"open at the moment of loss")
            assert held.recv(100) == b"open at the moment of loss"
            gateway.kill()
            lost = _wait(agent_socket, record["id"], "reconnecting")
            assert lost["reason"] and lost["port"] == record["port"]
            with pytest.raises(ConnectionResetError):  # a reset, not a clean end
                while held.recv(100):
                    pass
            held.close()

            gateway = GatewayProcess(config, tmp_path, port=gateway.port)
            healed = _wait(agent_socket, record["id"], "up")
            assert healed["port"] == record["port"] and healed["reason"] == ""
            data = payload(256 * 1024, seed=3)
            assert hashlib.sha256(echo_roundtrip(record["port"], data)).digest() == hashlib.sha256(data).digest()
        finally:
            gateway.stop()


def test_a_refusal_is_not_retried_and_backoff_grows_with_jitter() -> None:
    assert is_permanent(RouterRefusal("router: unknown resource", 404))
    assert is_permanent(RouterRefusal("router: not yours", 403))
    assert not is_permanent(RouterRefusal("router: gateway offline", 503))
    import random
    delays = [backoff_delay(i, random.Random(7)) for i in range(10)]
    assert delays[0] < 0.5 and delays[-1] <= 30 and delays[5] > delays[1]
    assert backoff_delay(3, random.Random(1)) != backoff_delay(3, random.Random(2))


def test_a_resource_removed_while_reconnecting_ends_the_tunnel_without_retrying(agent_socket: Path,
                                                                                tmp_path: Path) -> None:
    with EchoServer() as echo:
        config = make_config([{"name": "db", "kind": "tcp", "host": "127.0.0.1", "port": echo.port},
                              {"name": "other", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}],
                             host_addresses=["127.0.0.1"], ice_servers=[])
        gateway = GatewayProcess(config, tmp_path)
        try:
            env = shell_env(tmp_path, agent_socket, PAM_ROUTER_URL=gateway.router_url,
                            PAM_TOKEN=gateway.user_token("alice"))
            started = run_shell(env, "pam tunnel start db --background --json")
            assert started.returncode == 0, started.stderr
            record = last_json(started.stdout)
            gateway.kill()
            _wait(agent_socket, record["id"], "reconnecting")
            config["resources"] = [r for r in config["resources"] if r["name"] != "db"]  # db removed
            gateway = GatewayProcess(config, tmp_path, port=gateway.port)
            ended = _wait(agent_socket, record["id"], "lost")
            assert "db" in ended["reason"], ended
            with pytest.raises(ConnectionRefusedError):  # the listener is closed: no retry holds it
                socket.create_connection(("127.0.0.1", record["port"]), timeout=10)
        finally:
            gateway.stop()
