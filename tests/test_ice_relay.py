"""The relay policy: with ice_transport_policy = "relay" no host or server-reflexive candidate
leaves the machine. Checked on what the router itself relayed (every gateway-link frame, both
ways), with coturn on 127.0.0.1 as the TURN server (UDP and TCP), real router, gateway and peers.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from commander_pam_plugin import protocol, rtc
from commander_pam_plugin.config import load_config
from commander_pam_plugin.errors import PamError
from commander_pam_plugin.gateway.embedded import EmbeddedGateway
from commander_pam_plugin.loop import BackgroundLoop
from commander_pam_plugin.negotiation import ConnectOptions, RouterClient, open_session
from gateway_support import EchoServer, free_port, make_config
from netlab import coturn

needs_coturn = pytest.mark.skipif(not coturn.available(), reason="coturn (turnserver) is not installed")
CANDIDATE_TYPE = re.compile(r"candidate:\S+ \d+ \S+ \d+ \S+ \d+ typ (\w+)")


@pytest.fixture(scope="module")
def echo() -> EchoServer:
    with EchoServer() as server:
        yield server


@pytest.fixture(scope="module")
def turn(tmp_path_factory: pytest.TempPathFactory) -> coturn.Coturn:
    if not coturn.available():
        pytest.skip("coturn (turnserver) is not installed")
    port = free_port()
    with coturn.Coturn("127.0.0.1", tmp_path_factory.mktemp("turn"), port=port, allow_loopback_peers=True) as server:
        yield server


@needs_coturn
@pytest.mark.parametrize("addresses", [["127.0.0.1"], []], ids=["with-host-addresses", "no-host-addresses"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("trickle", [True, False], ids=["trickle", "non-trickle"])
def test_relay_policy_connects_and_no_host_or_srflx_candidate_passes_the_router(
        echo: EchoServer, turn: coturn.Coturn, transport: str, trickle: bool, addresses: list[str]) -> None:
    servers = [turn.turn(transport), turn.stun_url()]  # a STUN server too: relay must ignore it
    resources = [{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}]
    config = make_config(resources, ice_servers=servers, ice_transport_policy="relay", host_addresses=addresses)
    frames: list[tuple[str, str]] = []
    with EmbeddedGateway(config) as gw:
        gw.router.observe(lambda gateway, direction, frame: frames.append((direction, frame)))
        loop = BackgroundLoop()
        router = RouterClient(gw.router_url, gw.user_token("alice"))
        try:
            session = open_session(loop, router, gw.gateway_name, "echo", protocol.SessionRequest(),
                                   ice_servers=rtc.ice_servers_from_config(servers), host_addresses=addresses,
                                   ice_transport_policy="relay", options=ConnectOptions(trickle=trickle))
            try:
                assert rtc.selected_pair_types(session.peer.pc) == ("relay", "relay")
            finally:
                session.close()
        finally:
            router.close()
            loop.stop()
    seen = {direction: [t for _, frame in frames if _ == direction for t in CANDIDATE_TYPE.findall(frame)]
            for direction in ("in", "out")}
    assert seen["out"] and seen["in"], "the router relayed no candidate at all"
    assert set(seen["out"]) == {"relay"} and set(seen["in"]) == {"relay"}, seen
    relayed = "".join(frame for _, frame in frames)
    assert turn.password not in relayed  # the TURN credential never rides the signaling


def test_policy_all_does_send_host_candidates_through_the_router(echo: EchoServer) -> None:
    """The counter-check: the same frame reading sees host candidates when the policy is 'all'."""
    resources = [{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}]
    frames: list[str] = []
    with EmbeddedGateway(make_config(resources)) as gw:
        gw.router.observe(lambda gateway, direction, frame: frames.append(frame))
        loop = BackgroundLoop()
        router = RouterClient(gw.router_url, gw.user_token("alice"))
        try:
            session = open_session(loop, router, gw.gateway_name, "echo", protocol.SessionRequest(),
                                   ice_servers=[], host_addresses=["127.0.0.1"])
            session.close()
        finally:
            router.close()
            loop.stop()
    assert "host" in {t for frame in frames for t in CANDIDATE_TYPE.findall(frame)}


def test_relay_policy_accepts_no_host_addresses_and_all_refuses_them(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('ice_transport_policy = "relay"\nhost_addresses = []\n')
    config = load_config({"PAM_CONFIG": str(path), "HOME": str(tmp_path)})
    assert (config.ice_transport_policy, config.host_addresses) == ("relay", ())
    path.write_text('host_addresses = []\n')
    with pytest.raises(PamError, match="host_addresses: at least one"):
        load_config({"PAM_CONFIG": str(path), "HOME": str(tmp_path)})
    path.write_text('ice_transport_policy = "turn-only"\n')
    with pytest.raises(PamError, match="ice_transport_policy: must be one of all, relay"):
        load_config({"PAM_CONFIG": str(path), "HOME": str(tmp_path)})
    path.write_text('ice_servers = ["turn:127.0.0.1:3478"]\n')
    with pytest.raises(PamError, match="needs a username and credential"):
        load_config({"PAM_CONFIG": str(path), "HOME": str(tmp_path)})
