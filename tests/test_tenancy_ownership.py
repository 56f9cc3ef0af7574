"""Resource ownership is configuration: a second gateway with a valid token that announces the
owner's resource is refused (one WARNING), never listed and never sent an offer for it, with
the owner online and offline, while the owner's users keep their tunnels and open new ones."""
from __future__ import annotations

import json
import logging

import pytest
from gateway_support import (OFFLINE_GATEWAY, ClientPeer, EchoServer, RouterClient, connect, make_config,
                             new_conversation_id, run)
from tenancy_support import ExtraAgent, Records, echo_resource, echo_through, gateway_settings, offers_to

from commander_pam_plugin.gateway.config import ConfigError, config_from_dict
from commander_pam_plugin.gateway.embedded import EmbeddedGateway

OWNER = "gw-owner"


async def _offer_by_resource(client: RouterClient, resource: str) -> tuple[int, dict]:
    peer = ClientPeer()
    body = {"conversation_id": new_conversation_id(), "kind": "offer", "trickle_ice": False,
            "data": {"type": "offer", "sdp": await peer.offer(), "resource": resource}}
    try:
        status, reply, _ = await client.request("POST", f"/api/v1/resources/{resource}/actions",
                                                body=json.dumps(body).encode())
    finally:
        await peer.close()
    if status == 200:
        await client.action(reply["gateway"]["name"], body["conversation_id"], "close")
    return status, reply


async def _offer_to(client: RouterClient, gateway: str, resource: str) -> tuple[int, dict]:
    peer = ClientPeer()
    try:
        return await client.action(gateway, new_conversation_id(), "offer",
                                   {"type": "offer", "sdp": await peer.offer(), "resource": resource})
    finally:
        await peer.close()


def test_a_second_gateway_announcing_the_owners_resource_never_gets_an_offer_for_it():
    with EchoServer() as owner_echo, EchoServer() as rogue_echo:
        data = make_config([echo_resource(owner_echo)], gateway=OWNER)
        rogue_token = next(g["token"] for g in data["gateways"] if g["name"] == OFFLINE_GATEWAY)
        tokens = {u["name"]: u["token"] for u in data["users"]}
        with EmbeddedGateway(data) as stack:
            to_rogue = offers_to(stack, OFFLINE_GATEWAY)
            rogue = ExtraAgent(stack, gateway_settings(OFFLINE_GATEWAY, rogue_token,
                                                       [echo_resource(rogue_echo), echo_resource(rogue_echo, "own")]))
            with Records() as logs:
                rogue.start()
            refusals = [r for r in logs.at(logging.WARNING, "commander_pam_plugin.gateway.router")
                        if "may not serve" in r.getMessage()]
            assert len(refusals) == 1 and OFFLINE_GATEWAY in refusals[0].getMessage() \
                and "echo" in refusals[0].getMessage() and "own" not in refusals[0].getMessage()
            owner_again = ExtraAgent(stack, stack.config.gateway)

            async def main() -> None:
                async with RouterClient(stack.router_url, tokens["alice"]) as alice, \
                        RouterClient(stack.router_url, tokens["bob"]) as bob:
                    honest = await connect(alice, OWNER, "echo")
                    await echo_through(honest, 2, b"before" * 1000)
                    # Owner online: listed once, from the owner; offers by resource go to the owner.
                    status, listing = await bob.get("/api/v1/resources")
                    assert status == 200 and [r for r in listing["resources"] if r["name"] == "echo"] == \
                        [{"name": "echo", "kind": "tcp", "gateway": OWNER}], listing
                    status, reply = await _offer_by_resource(bob, "echo")
                    assert status == 200 and reply["gateway"]["name"] == OWNER, reply
                    status, reply = await _offer_to(bob, OFFLINE_GATEWAY, "echo")
                    assert status == 404 and f"{OFFLINE_GATEWAY} does not serve resource echo" in \
                        reply["error"]["message"], reply
                    await echo_through(honest, 4, b"during" * 1000)  # alice's tunnel never noticed
                    # What the config lets the second gateway serve still works.
                    status, reply = await _offer_by_resource(bob, "own")
                    assert status == 200 and reply["gateway"]["name"] == OFFLINE_GATEWAY, reply
                    await honest.close(alice, OWNER)
                    # Owner offline: the claimant still gets nothing, by resource or by name.
                    stack.run(stack.agent.stop(), 15)
                    status, reply = await _offer_by_resource(bob, "echo")
                    assert status == 404 and "unknown resource echo" in reply["error"]["message"], reply
                    status, reply = await _offer_to(bob, OFFLINE_GATEWAY, "echo")
                    assert status == 404, reply
                    status, listing = await bob.get("/api/v1/resources")
                    assert [r["name"] for r in listing["resources"]] == ["own"], listing
                    # Owner back: new sessions work again.
                    owner_again.start()
                    fresh = await connect(bob, OWNER, "echo")
                    await echo_through(fresh, 2, b"after" * 1000)
                    await fresh.close(bob, OWNER)

            try:
                run(main(), 90)
            finally:
                owner_again.stop()
                rogue.stop()
            assert to_rogue.count("offer") == 1  # only the offer for "own", which it may serve
            assert rogue_echo.connections == 0


def test_a_gateway_with_a_resource_list_may_serve_only_those_and_the_rest_stays_open_to_others():
    data = make_config([{"name": "mine", "kind": "tcp", "host": "127.0.0.1", "port": 1}], gateway="gw-own")
    data["gateways"] = [{"name": "gw-pinned", "token": "p" * 20, "resources": ["db"]},
                        {"name": "gw-free", "token": "f" * 20}]
    router = config_from_dict(data).router
    assert router.may_serve("gw-pinned", "db") and not router.may_serve("gw-pinned", "other")
    assert not router.may_serve("gw-free", "db") and not router.may_serve("gw-free", "mine")
    assert router.may_serve("gw-free", "other") and router.may_serve("gw-own", "other")
    assert router.may_serve("gw-own", "mine") and not router.may_serve("gw-own", "db")
    assert not router.may_serve("gw-unknown", "other")
    data["gateways"][0]["resources"] = ["db", "not a name"]
    with pytest.raises(ConfigError, match=r"gateways\[0\]\.resources\[1\]: must be a resource name"):
        config_from_dict(data)
