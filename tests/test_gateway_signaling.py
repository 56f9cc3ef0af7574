"""Signaling end to end: real router, real gateway agent, real aiortc peers over HTTP/WebSocket."""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from gateway_support import (OFFLINE_GATEWAY, ClientPeer, EchoServer, RouterClient, connect, free_port,
                             make_config, new_conversation_id, run)

from commander_pam_plugin.gateway.embedded import EmbeddedGateway
from commander_pam_plugin.protocol import MAX_CANDIDATES_PER_BATCH, MAX_CONVERSATIONS_PER_USER, split_sdp_candidates


@pytest.fixture(scope="module")
def echo():
    with EchoServer() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(echo):
    resources = [{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port},
                 {"name": "closed", "kind": "tcp", "host": "127.0.0.1", "port": free_port()},
                 {"name": "bob-only", "kind": "tcp", "host": "127.0.0.1", "port": echo.port, "users": ["bob"]}]
    with EmbeddedGateway(make_config(resources, ice_timeout=1.5)) as gw:
        yield gw


def client(gw: EmbeddedGateway, user: str = "alice") -> RouterClient:
    return RouterClient(gw.router_url, gw.user_token(user))


async def echo_round_trip(session, stream_id: int, payload: bytes = b"ping") -> None:
    channel, reply = await session.peer.open_stream(stream_id)
    assert reply["op"] == "opened", reply
    channel.send(payload)
    received = b""
    while len(received) < len(payload):
        received += await channel.receive()
    assert received == payload
    channel.channel.close()


def test_health_and_gateway_status(gateway):
    async def main():
        async with client(gateway) as c:
            assert await c.get("/api/v1/health") == (200, {"ok": True, "version": 1})
            status, body = await c.get(f"/api/v1/gateways/{gateway.gateway_name}")
            assert status == 200
            assert body["online"] is True and body["version"] == "1.8.0"
            assert body["capabilities"] == ["trickle", "batch_candidates"]
    run(main())


def test_non_trickle_offer_is_answered_in_the_reply(gateway):
    async def main():
        async with client(gateway) as c:
            session = await connect(c, gateway.gateway_name, "echo", trickle=False)
            assert session.conversation_id in gateway.agent.sessions
            vias = {r["via"] for r in gateway.agent.applied_candidates[session.conversation_id]}
            assert vias == {"sdp"}
            await echo_round_trip(session, 2)
            await session.close(c, gateway.gateway_name)
            assert session.conversation_id not in gateway.agent.sessions
    run(main())


def test_trickle_offer_is_accepted_then_answered_on_the_stream(gateway):
    async def main():
        async with client(gateway) as c:
            session = await connect(c, gateway.gateway_name, "echo", trickle=True, candidates="batch")
            types = [e["type"] for e in session.stream.events]
            assert types[:2] == ["ready", "answer"]
            await echo_round_trip(session, 2)
            await session.close(c, gateway.gateway_name)
    run(main())


def test_a_batch_and_a_single_candidate_both_reach_the_gateway(gateway):
    async def main():
        async with client(gateway) as c:
            session = await connect(c, gateway.gateway_name, "echo", trickle=True, candidates="batch+single",
                                    host_addresses=("127.0.0.1", "127.0.0.2"))
            record = gateway.agent.applied_candidates[session.conversation_id]
            assert [r["via"] for r in record] == ["batch", "single"]
            assert " 127.0.0.1 " in record[0]["candidate"] and " 127.0.0.2 " in record[1]["candidate"]
            # batch, single, and the end-of-candidates marker: three icecandidate actions counted
            assert gateway.router.conversation_stats[session.conversation_id]["icecandidate"] == 3
            await echo_round_trip(session, 2)
            await session.close(c, gateway.gateway_name)
    run(main())


def test_candidates_that_arrive_before_the_offer_are_queued(gateway):
    async def main():
        async with client(gateway) as c:
            cid = new_conversation_id()
            stream = await c.stream(cid)
            peer = ClientPeer()
            bare, wire, _ = split_sdp_candidates(await peer.offer())
            status, body = await c.action(gateway.gateway_name, cid, "icecandidate",
                                          {"candidates": wire, "end_of_candidates": True})
            assert (status, body["data"]) == (200, {"applied": len(wire)})
            status, reply = await c.action(gateway.gateway_name, cid, "offer",
                                           {"type": "offer", "sdp": bare, "resource": "echo",
                                            "session": {"mode": "tunnel"}})
            assert status == 200, reply
            assert [r["via"] for r in gateway.agent.applied_candidates[cid]] == ["batch"] * len(wire)
            await peer.accept(reply["data"]["sdp"])
            await peer.connected()
            await stream.wait_for("state", state="connected")
            await c.action(gateway.gateway_name, cid, "close")
            await peer.close()
            await stream.close()
    run(main())


def test_tunnel_streams_half_close_and_refusal(gateway):
    async def main():
        async with client(gateway) as c:
            session = await connect(c, gateway.gateway_name, "echo")
            channel, reply = await session.peer.open_stream(4)
            assert (reply["op"], reply["id"]) == ("opened", 4)  # and its flow-control "window"
            payload = bytes(range(256)) * 1024  # 256 KiB: several 16 KiB messages each way
            channel.send(payload)
            channel.send_control("eof")
            data, message = await channel.read_until("eof")
            assert data == payload and message == {"op": "eof"}
            assert await channel.receive() is None  # both sides done: the gateway closes the channel
            _, reply = await session.peer.open_stream(1)
            assert reply["op"] == "refused" and "stream id" in reply["reason"]
            await echo_round_trip(session, 6)  # the tunnel stays up after a refusal
            await session.close(c, gateway.gateway_name)

            session = await connect(c, gateway.gateway_name, "closed")
            channel, reply = await session.peer.open_stream(2)
            assert reply["op"] == "refused" and "closed" in reply["reason"]
            await session.close(c, gateway.gateway_name)
    run(main())


def test_control_channel_ping(gateway):
    async def main():
        async with client(gateway) as c:
            session = await connect(c, gateway.gateway_name, "echo")
            session.peer.control.send("not json")  # refused with a reason, never fatal
            session.peer.control.send_control("ping")
            refused = await session.peer.control.receive()
            assert refused["op"] == "refused" and "not valid JSON" in refused["reason"]
            assert await session.peer.control.receive() == {"op": "pong"}
            await session.close(c, gateway.gateway_name)
    run(main())


def test_resources_follow_the_allow_list(gateway):
    async def main():
        async with client(gateway, "alice") as alice, client(gateway, "bob") as bob:
            status, body = await alice.get("/api/v1/resources")
            assert status == 200
            assert {r["name"] for r in body["resources"]} == {"echo", "closed"}
            assert all(r == {"name": r["name"], "kind": "tcp", "gateway": gateway.gateway_name}
                       for r in body["resources"])
            status, body = await bob.get("/api/v1/resources")
            assert "bob-only" in {r["name"] for r in body["resources"]}
            status, body = await alice.action(gateway.gateway_name, None, "resources")
            assert status == 200 and "bob-only" not in {r["name"] for r in body["data"]["resources"]}
            status, body = await alice.action(gateway.gateway_name, None, "ping")
            assert (status, body["data"]) == (200, {"pong": True})
    run(main())


def test_offline_gateway_is_reported_at_once_by_name(gateway):
    async def main():
        async with client(gateway) as c:
            started = time.monotonic()
            status, body = await c.get(f"/api/v1/gateways/{OFFLINE_GATEWAY}")
            assert status == 503 and body["error"]["code"] == "gateway_offline"
            assert OFFLINE_GATEWAY in body["error"]["message"]
            status, body = await c.action(OFFLINE_GATEWAY, new_conversation_id(), "ping")
            assert status == 503 and OFFLINE_GATEWAY in body["error"]["message"]
            assert time.monotonic() - started < 1.0
    run(main())


def test_peer_loss_and_ice_timeout_free_the_session(gateway):
    async def main():
        async with client(gateway) as c:
            session = await connect(c, gateway.gateway_name, "echo")
            await session.peer.close()  # no close action: the gateway must notice on its own
            event = await session.stream.wait_for("state", state="closed")
            assert event["reason"] == "peer connection lost"
            assert session.conversation_id not in gateway.agent.sessions

            cid = new_conversation_id()
            stream = await c.stream(cid)
            peer = ClientPeer()
            status, _ = await c.action(gateway.gateway_name, cid, "offer",
                                       {"type": "offer", "sdp": await peer.offer(), "resource": "echo"})
            assert status == 200
            await peer.close()  # never applies the answer: ICE cannot connect
            event = await stream.wait_for("state", state="failed")
            assert "ICE did not connect" in event["reason"]
            assert cid not in gateway.agent.sessions
    run(main())


def test_events_sent_before_the_stream_opens_are_kept(gateway):
    async def main():
        async with client(gateway) as c:
            cid = new_conversation_id()
            peer = ClientPeer()
            status, body = await c.action(gateway.gateway_name, cid, "offer",
                                          {"type": "offer", "sdp": await peer.offer(), "resource": "echo"},
                                          trickle=True)
            assert body["data"] == {"accepted": True}
            stream = await c.stream(cid)  # opened after the answer was sent
            answer = await stream.wait_for("answer")
            await peer.accept(answer["sdp"])
            await peer.connected()
            await stream.wait_for("state", state="connected")
            await c.action(gateway.gateway_name, cid, "close")
            await stream.wait_for("state", state="closed")
            assert await stream.next() is None  # the stream closes with the conversation
            await peer.close()
    run(main())


def test_legacy_gateway_refuses_batches_and_answers_in_the_reply(echo):
    resources = [{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}]
    with EmbeddedGateway(make_config(resources, legacy=True)) as gw:
        async def main():
            async with client(gw) as c:
                status, body = await c.get(f"/api/v1/gateways/{gw.gateway_name}")
                assert (body["version"], body["capabilities"]) == ("1.6.0", [])
                cid = new_conversation_id()
                peer = ClientPeer(host_addresses=("127.0.0.1", "127.0.0.2"))
                bare, wire, _ = split_sdp_candidates(await peer.offer())
                status, reply = await c.action(gw.gateway_name, cid, "offer",
                                               {"type": "offer", "sdp": bare, "resource": "echo"}, trickle=True)
                assert status == 200 and reply["data"]["type"] == "answer"
                status, body = await c.action(gw.gateway_name, cid, "icecandidate", {"candidates": wire})
                assert status == 400 and "one candidate per action" in body["error"]["message"]
                for candidate in wire:
                    status, body = await c.action(gw.gateway_name, cid, "icecandidate", {"candidate": candidate})
                    assert (status, body["data"]) == (200, {"applied": 1})
                assert [r["via"] for r in gw.agent.applied_candidates[cid]] == ["single", "single"]
                await peer.accept(reply["data"]["sdp"])
                await peer.connected()
                await c.action(gw.gateway_name, cid, "close")
                await peer.close()
        run(main())


def test_capability_override_trickle_without_batch(echo):
    resources = [{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}]
    with EmbeddedGateway(make_config(resources, capabilities=["trickle"])) as gw:
        async def main():
            async with client(gw) as c:
                status, body = await c.get(f"/api/v1/gateways/{gw.gateway_name}")
                assert (body["version"], body["capabilities"]) == ("1.8.0", ["trickle"])
                session = await connect(c, gw.gateway_name, "echo", trickle=True, candidates="single")
                assert session.stream.events[1]["type"] == "answer"
                status, body = await c.action(gw.gateway_name, session.conversation_id, "icecandidate",
                                              {"candidates": []})
                assert status == 400
                await session.close(c, gw.gateway_name)
        run(main())


def _is_one_line_error(body) -> bool:
    return (isinstance(body, dict) and body.get("ok") is False and isinstance(body["error"]["message"], str)
            and body["error"]["message"] and "\n" not in body["error"]["message"])


def test_bad_input_gets_a_clear_4xx_while_another_session_keeps_passing_data(gateway):
    async def main():
        async with client(gateway, "bob") as bob, client(gateway, "alice") as alice, \
                RouterClient(gateway.router_url, None) as anonymous, \
                RouterClient(gateway.router_url, "not-a-real-token-at-all") as stranger:
            session = await connect(bob, gateway.gateway_name, "echo")
            gw = gateway.gateway_name
            actions = f"/api/v1/gateways/{gw}/actions"
            good_sdp = split_sdp_candidates(await ClientPeer().offer())[0]
            cid = new_conversation_id()

            def body(**fields) -> bytes:
                return json.dumps({"conversation_id": cid, "kind": "ping", "data": {}, **fields}).encode()

            def offer(**data) -> bytes:
                return body(kind="offer", data={"type": "offer", "sdp": good_sdp, "resource": "echo", **data})

            cases = [
                (anonymous, "POST", actions, body(), 401),
                (stranger, "POST", actions, body(), 401),
                (stranger, "GET", "/api/v1/resources", None, 401),
                (alice, "POST", f"/api/v1/gateways/{gw}/actions",
                 json.dumps({"conversation_id": session.conversation_id, "kind": "close", "data": {}}).encode(), 403),
                (alice, "GET", f"/api/v1/conversations/{session.conversation_id}/stream", None, 403),
                (alice, "POST", "/api/v1/gateways/no-such-gw/actions", body(), 404),
                (alice, "POST", actions, offer(resource="no-such-resource"), 404),
                (alice, "POST", actions, offer(resource="bob-only"), 403),
                (alice, "POST", actions, b"{not json", 400),
                (alice, "POST", actions, b"[1, 2]", 400),
                (alice, "POST", actions, body(kind=5), 400),
                (alice, "POST", actions, body(trickle_ice="yes"), 400),
                (alice, "POST", actions, body(conversation_id=12345678, kind="close"), 400),
                (alice, "POST", actions, offer(session={"mode": "terminal", "cols": "wide"}), 400),
                (alice, "POST", actions, b"{" + b" " * 70_000 + b"}", 413),
                (alice, "POST", actions, body(kind="icecandidate", data={"candidates": [
                    {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host"}] * (MAX_CANDIDATES_PER_BATCH + 1)}),
                 400),
                (alice, "POST", actions, body(kind="icecandidate", data={"candidate": {"candidate": "candidate:junk"}}),
                 400),
                (alice, "POST", actions, offer(sdp="v=0\r\nthis is not sdp"), 400),
                (alice, "GET", "/api/v1/no/such/route", None, 404),
                (alice, "DELETE", "/api/v1/health", None, 405),
            ]
            for index, (who, method, path, payload, expected) in enumerate(cases):
                status, reply, headers = await who.request(method, path, body=payload)
                assert status == expected, (index, status, reply)
                assert _is_one_line_error(reply), (index, reply)
                assert headers["Content-Type"].startswith("application/json"), index
                await echo_round_trip(session, 2 + 2 * index, b"still here %d" % index)
            assert session.conversation_id in gateway.agent.sessions
            await session.close(bob, gw)
    run(main())


def test_wrong_gateway_token_is_closed_with_4401(gateway):
    async def main():
        async with client(gateway) as c:
            ws = await c.http.ws_connect(f"{gateway.router_url}/api/v1/gateway/connect",
                                         headers={"Authorization": "Bearer wrong-token-wrong-token"})
            await ws.send_json({"type": "hello", "gateway": gateway.gateway_name, "version": "1.8.0"})
            message = await ws.receive()
            assert message.type.name in ("CLOSE", "CLOSED") and ws.close_code == 4401
            status, body = await c.get(f"/api/v1/gateways/{gateway.gateway_name}")
            assert status == 200  # the real gateway is still online
    run(main())


def test_router_timeouts_and_rate_limit():
    """A gateway that never replies gets 504; a token over its action budget gets 429 + Retry-After."""
    from commander_pam_plugin.gateway.config import config_from_dict
    from commander_pam_plugin.gateway.router import Router

    data = make_config(router={"reply_timeout": 0.2, "rate_limit": 0.5, "rate_burst": 3})
    config = config_from_dict(data)

    async def main():
        router = Router(config.router)
        url = await router.start("127.0.0.1", 0)
        try:
            async with RouterClient(url, data["users"][0]["token"]) as c:
                silent = await c.http.ws_connect(f"{url}/api/v1/gateway/connect",
                                                 headers={"Authorization": f"Bearer {data['gateway']['token']}"})
                await silent.send_json({"type": "hello", "gateway": "gw-test", "version": "1.8.0",
                                        "capabilities": []})
                assert json.loads((await silent.receive()).data) == {"type": "welcome"}
                status, body = await c.action("gw-test", None, "ping")
                assert status == 504 and "gw-test did not reply" in body["error"]["message"]
                for _ in range(2):
                    await c.action("gw-test", None, "ping")
                status, body, headers = await c.request("POST", "/api/v1/gateways/gw-test/actions",
                                                         body=b'{"kind": "ping"}')
                assert status == 429 and int(headers["Retry-After"]) >= 1
                await silent.close()
        finally:
            await router.stop()
    run(main())


def test_a_user_cannot_hold_unlimited_conversations(gateway):
    async def main():
        async with client(gateway, "carol") as c:
            streams = [await c.stream(new_conversation_id()) for _ in range(MAX_CONVERSATIONS_PER_USER)]
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await c.stream(new_conversation_id())
            assert refused.value.status == 429
            status, _ = await c.action(gateway.gateway_name, new_conversation_id(), "ping")
            assert status == 200  # ping binds nothing
            await asyncio.gather(*(s.close() for s in streams))
    run(main())


def test_the_agent_reconnects_when_the_router_comes_back():
    from commander_pam_plugin.gateway.agent import GatewayAgent
    from commander_pam_plugin.gateway.config import config_from_dict
    from commander_pam_plugin.gateway.router import Router

    data = make_config()
    config = config_from_dict(data)

    async def main():
        port = free_port()
        agent = GatewayAgent(config.gateway, f"http://127.0.0.1:{port}")
        task = asyncio.ensure_future(agent.run())  # dials a closed port first, then backs off
        for _ in range(2):
            router = Router(config.router)
            await router.start("127.0.0.1", port)
            await asyncio.wait_for(agent.online.wait(), 10)
            async with RouterClient(router.url, data["users"][0]["token"]) as c:
                status, body = await c.action("gw-test", None, "ping")
                assert (status, body["data"]) == (200, {"pong": True})
            await router.stop()
            await asyncio.wait_for(agent.offline.wait(), 10)
        await agent.stop()
        await task
    run(main())


def test_a_slow_offer_does_not_hold_up_other_actions(echo):
    """A STUN server that never answers stalls the gateway's gathering (aioice waits 5 s);
    meanwhile other actions are served and the trickle 'accepted' reply is not held back."""
    resources = [{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}]
    with EmbeddedGateway(make_config(resources, ice_servers=[f"stun:127.0.0.1:{free_port()}"])) as gw:
        async def main():
            async with client(gw) as c:
                cid = new_conversation_id()
                stream = await c.stream(cid)
                peer = ClientPeer()
                order: list[str] = []

                async def wait_answer() -> dict:
                    answer = await stream.wait_for("answer", timeout=20)
                    order.append("answer")
                    return answer
                waiter = asyncio.ensure_future(wait_answer())
                status, body = await c.action(gw.gateway_name, cid, "offer",
                                              {"type": "offer", "sdp": await peer.offer(), "resource": "echo"},
                                              trickle=True)
                assert (status, body["data"]) == (200, {"accepted": True})
                status, _ = await c.action(gw.gateway_name, None, "ping")
                assert status == 200
                order.append("pong")
                answer = await waiter
                assert order == ["pong", "answer"]
                await peer.accept(answer["sdp"])
                await peer.connected()
                await c.action(gw.gateway_name, cid, "close")
                await peer.close()
        run(main())
