"""Peer reuse: with a live peer to a gateway, a second background tunnel to another resource of
that gateway rides the same peer (no signaling action at all), and the gateway still checks
each stream against the resource it names, as it checks an offer."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from agent_support import agent_socket, last_json, run_shell, shell_env  # noqa: F401
from client_support import echo_roundtrip
from commander_pam_plugin.gateway.embedded import EmbeddedGateway
from gateway_support import EchoServer, make_config


@pytest.fixture
def targets():
    with EchoServer() as first, EchoServer() as second, EchoServer() as third:
        yield first, second, third


@pytest.fixture
def gateway(targets):
    first, second, third = targets
    config = make_config([
        {"name": "db", "kind": "tcp", "host": "127.0.0.1", "port": first.port},
        {"name": "cache", "kind": "tcp", "host": "127.0.0.1", "port": second.port},
        {"name": "vault", "kind": "tcp", "host": "127.0.0.1", "port": third.port, "users": ["bob"]},
    ])
    with EmbeddedGateway(config) as gw:
        yield gw


def _count_actions(gateway: EmbeddedGateway) -> list[str]:
    frames: list[str] = []
    gateway.router.observe(lambda name, direction, frame: frames.append(frame) if direction == "out" else None)
    return frames


def test_a_second_tunnel_to_the_same_gateway_costs_no_signaling(gateway, targets, agent_socket: Path,
                                                                tmp_path: Path) -> None:
    env = shell_env(tmp_path, agent_socket, gateway)
    first = run_shell(env, "pam tunnel start db --background --json")
    assert first.returncode == 0, first.stderr
    assert echo_roundtrip(last_json(first.stdout)["port"], b"db") == b"db"
    frames = _count_actions(gateway)
    sessions = len(gateway.agent.sessions)

    second = run_shell(env, "pam tunnel start cache --background --json")
    assert second.returncode == 0, second.stderr
    record = last_json(second.stdout)
    assert echo_roundtrip(record["port"], b"cache") == b"cache"
    assert targets[1].connections == 1  # the stream reached cache's target, not db's
    assert frames == [], frames  # no offer, no candidate, nothing through the router
    assert len(gateway.agent.sessions) == sessions == 1


def test_a_reused_peer_is_no_way_into_a_resource_the_user_may_not_use(gateway, targets, agent_socket: Path,
                                                                       tmp_path: Path) -> None:
    env = shell_env(tmp_path, agent_socket, gateway)
    first = run_shell(env, "pam tunnel start db --background --json")
    assert first.returncode == 0, first.stderr
    # the client is told vault's gateway (as a vault record would) so that it tries the live peer
    from commander_pam_plugin.agent import client
    answer = client.request({"op": "start", "resource": "vault", "gateway": gateway.gateway_name}, path=agent_socket)
    port = answer["tunnel"]["port"]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"let me in")
        assert sock.recv(100) == b""  # refused at the gateway: nothing comes back
    assert targets[2].connections == 0
    [vault] = [t for t in client.request({"op": "list"}, path=agent_socket)["tunnels"] if t["resource"] == "vault"]
    assert vault["refused"] == 1 and "may not use resource vault" in vault["last_error"], vault
