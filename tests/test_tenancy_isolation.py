"""A gateway reaches only its own conversations and only under its own name; a user without a
valid token gets a JSON 401 with WWW-Authenticate. Another user's live tunnel is untouched."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from gateway_support import OFFLINE_GATEWAY, WAIT, EchoServer, RouterClient, connect, make_config, run
from tenancy_support import echo_resource, echo_through

from commander_pam_plugin.gateway.embedded import EmbeddedGateway


def test_a_gateway_cannot_reach_another_gateways_conversations_nor_take_its_name():
    with EchoServer() as echo:
        data = make_config([echo_resource(echo)])
        token = data["users"][0]["token"]
        rogue_token = next(g["token"] for g in data["gateways"] if g["name"] == OFFLINE_GATEWAY)
        with EmbeddedGateway(data) as stack:
            url, gateway = stack.router_url, stack.gateway_name

            async def main() -> None:
                async with RouterClient(url, token) as alice, aiohttp.ClientSession() as http:
                    honest = await connect(alice, gateway, "echo")
                    headers = {"Authorization": f"Bearer {rogue_token}"}
                    async with http.ws_connect(f"{url}/api/v1/gateway/connect", headers=headers) as link:
                        await link.send_json({"type": "hello", "gateway": gateway, "version": "1.8.0"})
                        assert (await link.receive(timeout=WAIT)).type == aiohttp.WSMsgType.CLOSE
                        assert link.close_code == 4401  # its token is not the other gateway's
                    assert stack.router.gateways[gateway].ws is not None
                    async with http.ws_connect(f"{url}/api/v1/gateway/connect", headers=headers) as link:
                        await link.send_json({"type": "hello", "gateway": OFFLINE_GATEWAY, "version": "1.8.0",
                                              "resources": []})
                        assert json.loads((await link.receive(timeout=WAIT)).data) == {"type": "welcome"}
                        for event in ({"type": "state", "state": "closed", "reason": "forged"},
                                      {"type": "error", "message": "forged"}):
                            await link.send_json({"type": "event", "conversation_id": honest.conversation_id,
                                                  "event": event})
                        # A round trip on the same link: the router has handled the frames before it.
                        ping = asyncio.ensure_future(alice.action(OFFLINE_GATEWAY, None, "ping"))
                        action = json.loads((await link.receive(timeout=WAIT)).data)
                        await link.send_json({"type": "reply", "id": action["id"], "ok": True, "data": {}})
                        assert (await ping)[0] == 200
                    with pytest.raises(asyncio.TimeoutError):
                        await honest.stream.next(timeout=1.0)
                    assert honest.conversation_id in stack.router.conversations
                    await echo_through(honest, 2, b"untouched" * 1000)
                    await honest.close(alice, gateway)
            run(main(), 60)


def test_a_missing_or_wrong_user_token_is_a_json_401_with_www_authenticate():
    with EmbeddedGateway(make_config()) as stack:
        async def main() -> None:
            async with RouterClient(stack.router_url, None) as anonymous, \
                    RouterClient(stack.router_url, "not-anyones-token-at-all") as stranger:
                for client in (anonymous, stranger):
                    status, body, headers = await client.request("GET", "/api/v1/resources")
                    assert status == 401 and headers["WWW-Authenticate"] == "Bearer" and body["ok"] is False
        run(main())
