"""A connect whose data plane never comes up says, in one line, what it tried and where to look."""
from __future__ import annotations

import pytest

from commander_pam_plugin import protocol, rtc
from commander_pam_plugin.errors import PamError
from commander_pam_plugin.gateway.embedded import EmbeddedGateway
from commander_pam_plugin.loop import BackgroundLoop
from commander_pam_plugin.negotiation import ConnectOptions, RouterClient, open_session
from gateway_support import EchoServer, make_config
from netlab.loopback import StunServer


@pytest.mark.parametrize("trickle", [True, False], ids=["trickle", "non-trickle"])
def test_no_usable_path_names_what_was_tried_and_points_at_diagnose(trickle: bool) -> None:
    # Relay policy with no TURN server: no candidate at all on the client, so ICE cannot connect.
    with EchoServer() as echo, StunServer() as stun:
        resources = [{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}]
        with EmbeddedGateway(make_config(resources, ice_timeout=1.0)) as gw:
            loop = BackgroundLoop()
            router = RouterClient(gw.router_url, gw.user_token("alice"))
            try:
                with pytest.raises(PamError) as caught:
                    open_session(loop, router, gw.gateway_name, "echo", protocol.SessionRequest(),
                                 ice_servers=rtc.ice_servers_from_config([stun.url]), host_addresses=[],
                                 ice_transport_policy="relay", options=ConnectOptions(trickle=trickle, timeout_s=10))
            finally:
                router.close()
                loop.stop()
    message = caught.value.message
    assert "\n" not in message
    assert "ICE did not connect" in message
    assert f"ICE servers {stun.url}" in message and "policy relay" in message
    assert "configure ice_servers" in message and "pam tunnel diagnose echo" in message
