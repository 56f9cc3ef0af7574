"""Conversations come back: idle ones expire, a restarted gateway frees the ones it lost, the
per-user cap is a JSON 429 to that user only, and after a router restart a stranger who names
another user's conversation id is refused and never bound to it (the gateway's reply decides)."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from gateway_support import (OFFLINE_GATEWAY, WAIT, EchoServer, RouterClient, connect, free_port, make_config,
                             new_conversation_id, run)
from tenancy_support import ExtraAgent, echo_resource, echo_through, gateway_settings

from commander_pam_plugin.gateway.agent import GatewayAgent
from commander_pam_plugin.gateway.config import config_from_dict
from commander_pam_plugin.gateway.embedded import EmbeddedGateway
from commander_pam_plugin.gateway.router import Router

END_ONLY = {"end_of_candidates": True}  # an icecandidate action with no offer: binds a conversation


async def _until(predicate, what: str) -> None:
    """Wait for router state (polled: it changes on the router's own beat), at most WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_the_per_user_cap_is_a_json_429_to_that_user_only():
    data = make_config(router={"max_conversations_per_user": 2, "conversation_timeout": 600})
    tokens = {u["name"]: u["token"] for u in data["users"]}
    with EmbeddedGateway(data) as stack:
        async def main() -> None:
            async with RouterClient(stack.router_url, tokens["alice"]) as alice, \
                    RouterClient(stack.router_url, tokens["bob"]) as bob:
                gateway = stack.gateway_name
                for _ in range(2):
                    status, body = await alice.action(gateway, new_conversation_id(), "icecandidate", END_ONLY)
                    assert status == 200, body
                status, body, headers = await alice.request(
                    "POST", f"/api/v1/gateways/{gateway}/actions",
                    body=json.dumps({"conversation_id": new_conversation_id(), "kind": "icecandidate",
                                     "data": END_ONLY}).encode())
                assert status == 429 and headers["Content-Type"].startswith("application/json")
                assert body["error"] == {"code": "rate_limited",
                                         "message": "user alice has 2 open conversations (the limit is 2); "
                                                    "close some first"}
                status, body = await bob.action(gateway, new_conversation_id(), "icecandidate", END_ONLY)
                assert status == 200, body  # bob is not alice
        run(main())


def test_idle_conversations_expire_and_a_live_tunnel_does_not():
    with EchoServer() as echo:
        data = make_config([echo_resource(echo)],
                           router={"max_conversations_per_user": 3, "conversation_timeout": 0.5})
        token = data["users"][0]["token"]
        with EmbeddedGateway(data) as stack:
            router, gateway = stack.router, stack.gateway_name

            async def main() -> None:
                async with RouterClient(stack.router_url, token) as alice:
                    live = await connect(alice, gateway, "echo")
                    await live.stream.close()  # the tunnel goes on without a stream, as a client may do
                    idle = [new_conversation_id() for _ in range(2)]
                    for cid in idle:
                        status, body = await alice.action(gateway, cid, "icecandidate", END_ONLY)
                        assert status == 200, body
                    status, body = await alice.action(gateway, new_conversation_id(), "icecandidate", END_ONLY)
                    assert status == 429, body
                    await _until(lambda: not any(cid in router.conversations for cid in idle),
                                 "the candidate-only conversations to expire")
                    assert live.conversation_id in router.conversations  # a connected peer is not idle
                    await echo_through(live, 2, b"still here" * 1000)
                    status, body = await alice.action(gateway, new_conversation_id(), "icecandidate", END_ONLY)
                    assert status == 200, body
                    await alice.action(gateway, live.conversation_id, "close")
                    await live.peer.close()
            run(main())


def test_a_restarted_gateway_frees_the_conversations_it_no_longer_has():
    with EchoServer() as echo:
        data = make_config(router={"max_conversations_per_user": 2, "conversation_timeout": 600})
        gateway_token = next(g["token"] for g in data["gateways"] if g["name"] == OFFLINE_GATEWAY)
        settings = gateway_settings(OFFLINE_GATEWAY, gateway_token, [echo_resource(echo)])
        token = data["users"][0]["token"]
        with EmbeddedGateway(data) as stack:
            first, second = ExtraAgent(stack, settings), ExtraAgent(stack, settings)
            first.start()

            async def main() -> None:
                async with RouterClient(stack.router_url, token) as alice:
                    watched = await connect(alice, OFFLINE_GATEWAY, "echo")
                    gone = await connect(alice, OFFLINE_GATEWAY, "echo")
                    await gone.stream.close()  # its client went away without `close`
                    first.kill()  # and then the gateway died, before ICE consent noticed
                    second.start()  # the restarted gateway has no sessions: its hello says so
                    event = await watched.stream.wait_for("state")
                    assert event["state"] == "closed" and "restarted" in event["reason"], event
                    assert await watched.stream.next() is None  # and the router closed that stream
                    assert gone.conversation_id not in stack.router.conversations
                    for session in (watched, gone):
                        await session.peer.close()
                    fresh = [await connect(alice, OFFLINE_GATEWAY, "echo") for _ in range(2)]  # both slots back
                    await echo_through(fresh[0], 2, b"fresh" * 1000)
                    for session in fresh:
                        await session.close(alice, OFFLINE_GATEWAY)
            try:
                run(main(), 90)
            finally:
                second.stop()
                first.stop()


def test_after_a_router_restart_a_stranger_naming_a_live_conversation_is_refused_and_gets_none_of_its_events():
    with EchoServer() as echo:
        data = make_config([echo_resource(echo)])
        config = config_from_dict(data)
        tokens = {u["name"]: u["token"] for u in data["users"]}
        port = free_port()

        async def main() -> None:
            router = Router(config.router)
            url = await router.start("127.0.0.1", port)
            agent = GatewayAgent(config.gateway, url)
            task = asyncio.ensure_future(agent.run())
            await asyncio.wait_for(agent.online.wait(), WAIT)
            gateway = config.gateway.name
            async with RouterClient(url, tokens["alice"]) as alice, \
                    RouterClient(url, tokens["bob"]) as mallory, RouterClient(url, tokens["carol"]) as carol:
                honest = await connect(alice, gateway, "echo")
                cid = honest.conversation_id
                await router.stop()
                await asyncio.wait_for(agent.offline.wait(), WAIT)
                router = Router(config.router)
                await router.start("127.0.0.1", port)
                await asyncio.wait_for(agent.online.wait(), WAIT)
                # The new router has never heard of cid: mallory's stream is accepted, but the
                # gateway refuses his action and the router does not keep him bound to its gateway.
                stranger = await mallory.stream(cid)
                status, body = await mallory.action(gateway, cid, "icecandidate", END_ONLY)
                assert status == 403 and "belongs to another user" in body["error"]["message"], body
                assert router.conversations[cid].gateway is None and not router.conversations[cid].confirmed
                await echo_through(honest, 2, b"alice's data" * 1000)  # alice's tunnel lives on
                # The session's events (here: its end) never reach mallory.
                await agent.sessions[cid].close("closed for the test")
                status, _ = await alice.action(gateway, None, "ping")  # after the event, on the same link
                assert status == 200
                with pytest.raises(asyncio.TimeoutError):
                    await stranger.next(timeout=1.0)
                await stranger.close()
                await honest.peer.close()
                await honest.stream.close()
                fresh = await connect(carol, gateway, "echo")  # new sessions are unaffected
                await echo_through(fresh, 2, b"carol" * 1000)
                await fresh.close(carol, gateway)
            await agent.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await router.stop()

        run(main(), 90)


def test_a_conversation_whose_gateway_is_gone_expires_even_if_its_peer_was_connected():
    with EchoServer() as echo:
        data = make_config(router={"conversation_timeout": 0.5})
        gateway_token = next(g["token"] for g in data["gateways"] if g["name"] == OFFLINE_GATEWAY)
        settings = gateway_settings(OFFLINE_GATEWAY, gateway_token, [echo_resource(echo)])
        with EmbeddedGateway(data) as stack:
            gateway = ExtraAgent(stack, settings)
            gateway.start()

            async def main() -> None:
                async with RouterClient(stack.router_url, data["users"][0]["token"]) as alice:
                    session = await connect(alice, OFFLINE_GATEWAY, "echo")
                    await session.stream.close()
                    gateway.kill()  # never comes back: no hello will ever free it
                    await _until(lambda: session.conversation_id not in stack.router.conversations,
                                 "the conversation of a gone gateway to expire")
                    await session.peer.close()
            try:
                run(main(), 60)
            finally:
                gateway.stop()
