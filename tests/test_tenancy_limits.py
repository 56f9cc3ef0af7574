"""Two limits SECURITY.md states: a gateway link that sends no hello is closed (4400) after
HELLO_TIMEOUT_S (10 s), and a gateway holds at most MAX_SESSIONS (256) sessions, refusing the
next offer with a JSON 503 while its other sessions keep working. Each test pins the number
and shows the mechanism with the limit lowered (so the test does not wait 10 s or build 256 peers)."""
from __future__ import annotations

import aiohttp
from gateway_support import (OFFLINE_GATEWAY, WAIT, ClientPeer, EchoServer, RouterClient, connect, make_config,
                             new_conversation_id, run)
from tenancy_support import echo_resource, echo_through

from commander_pam_plugin.gateway import agent as agent_module
from commander_pam_plugin.gateway import router as router_module
from commander_pam_plugin.gateway.embedded import EmbeddedGateway


def test_a_gateway_link_without_a_hello_is_closed_after_the_hello_timeout(monkeypatch):
    assert router_module.HELLO_TIMEOUT_S == 10.0
    monkeypatch.setattr(router_module, "HELLO_TIMEOUT_S", 0.3)
    data = make_config()
    gateway_token = next(g["token"] for g in data["gateways"] if g["name"] == OFFLINE_GATEWAY)
    with EmbeddedGateway(data) as stack:
        async def main() -> None:
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(f"{stack.router_url}/api/v1/gateway/connect",
                                           headers={"Authorization": f"Bearer {gateway_token}"}) as link:
                    message = await link.receive(timeout=WAIT)  # we say nothing
                    assert message.type == aiohttp.WSMsgType.CLOSE and link.close_code == 4400
            assert OFFLINE_GATEWAY not in stack.router.gateways
            async with RouterClient(stack.router_url, data["users"][0]["token"]) as alice:
                status, _ = await alice.action(stack.gateway_name, None, "ping")  # the real gateway is fine
                assert status == 200
        run(main())


def test_a_gateway_at_its_session_limit_refuses_the_next_offer_and_keeps_the_others(monkeypatch):
    assert agent_module.MAX_SESSIONS == 256
    monkeypatch.setattr(agent_module, "MAX_SESSIONS", 2)
    with EchoServer() as echo:
        data = make_config([echo_resource(echo)])
        tokens = {u["name"]: u["token"] for u in data["users"]}
        with EmbeddedGateway(data) as stack:
            gateway = stack.gateway_name

            async def main() -> None:
                async with RouterClient(stack.router_url, tokens["alice"]) as alice, \
                        RouterClient(stack.router_url, tokens["bob"]) as bob:
                    sessions = [await connect(alice, gateway, "echo"), await connect(bob, gateway, "echo")]
                    peer = ClientPeer()
                    status, body = await bob.action(gateway, new_conversation_id(), "offer",
                                                    {"type": "offer", "sdp": await peer.offer(), "resource": "echo"})
                    await peer.close()
                    assert status == 503 and body["error"]["message"] == \
                        f"gateway {gateway} is at its limit of 2 sessions", body
                    await echo_through(sessions[0], 2, b"alice" * 1000)
                    await sessions[1].close(bob, gateway)
                    again = await connect(bob, gateway, "echo")  # a freed slot is usable again
                    await echo_through(again, 2, b"bob" * 1000)
                    for session, client in ((sessions[0], alice), (again, bob)):
                        await session.close(client, gateway)
            run(main(), 60)


def test_a_hello_whose_conversations_are_not_a_list_is_refused_with_4400():
    data = make_config()
    gateway_token = next(g["token"] for g in data["gateways"] if g["name"] == OFFLINE_GATEWAY)
    with EmbeddedGateway(data) as stack:
        async def main() -> None:
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(f"{stack.router_url}/api/v1/gateway/connect",
                                           headers={"Authorization": f"Bearer {gateway_token}"}) as link:
                    await link.send_json({"type": "hello", "gateway": OFFLINE_GATEWAY, "version": "1.8.0",
                                          "conversations": "all of them"})
                    assert (await link.receive(timeout=WAIT)).type == aiohttp.WSMsgType.CLOSE
                    assert link.close_code == 4400
            assert OFFLINE_GATEWAY not in stack.router.gateways
        run(main())
