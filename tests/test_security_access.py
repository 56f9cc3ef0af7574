"""Access: who may do what, at the router and again at the gateway; tokens; private files."""
from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import reliability  # noqa: E402
from gateway_support import (ClientPeer, EchoServer, RouterClient, free_port, make_config,  # noqa: E402
                             new_conversation_id, run)

from commander_pam_plugin.gateway import router as router_module  # noqa: E402
from commander_pam_plugin.gateway.agent import GatewayAgent  # noqa: E402
from commander_pam_plugin.gateway.config import config_from_dict  # noqa: E402
from commander_pam_plugin.gateway.router import Router  # noqa: E402


def test_every_way_in_that_must_be_refused_is_refused(tmp_path):
    row = reliability.access_control(tmp_path)
    assert row.lost == 0, row.failures
    assert row.times >= 20


def test_tokens_are_compared_in_constant_time(mocker):
    data = make_config()
    config = config_from_dict(data)
    compare = mocker.spy(router_module.hmac, "compare_digest")

    async def main():
        router = Router(config.router)
        url = await router.start("127.0.0.1", 0)
        try:
            async with RouterClient(url, "not-anyones-token-at-all") as stranger:
                status, _ = await stranger.get("/api/v1/resources")
        finally:
            await router.stop()
        return status

    assert run(main()) == 401
    compared = {call.args[1] for call in compare.call_args_list}
    assert compared == {u["token"].encode() for u in data["users"]}  # every user's, each with compare_digest


def test_a_reply_held_across_a_router_restart_never_answers_another_users_request():
    """A restarted router numbers its requests from 1 again. The gateway must drop a reply that
    belongs to the old link, or bob's request 1 would get alice's answer to her request 1."""
    with EchoServer() as echo:
        # An unreachable STUN server stalls the gateway's gathering for 5 s: a slow non-trickle offer.
        data = make_config([reliability.echo_resource(echo)], ice_servers=[f"stun:127.0.0.1:{free_port()}"])
        config = config_from_dict(data)
        port = free_port()

        async def offer(client: RouterClient, peer: ClientPeer) -> tuple[int, dict]:
            body = {"type": "offer", "sdp": await peer.offer(), "resource": "echo"}
            return await client.action("gw-test", new_conversation_id(), "offer", body)

        async def main():
            router = Router(config.router)
            url = await router.start("127.0.0.1", port)
            agent = GatewayAgent(config.gateway, url)
            task = asyncio.ensure_future(agent.run())
            await asyncio.wait_for(agent.online.wait(), 10)
            alice_peer, bob_peer = ClientPeer(), ClientPeer()
            async with RouterClient(url, data["users"][0]["token"]) as alice, \
                    RouterClient(url, data["users"][1]["token"]) as bob:
                held = asyncio.ensure_future(offer(alice, alice_peer))  # request 1 on the first router
                while not agent.sessions:
                    await asyncio.sleep(0.01)  # until the gateway holds it (it is gathering)
                await router.stop()
                await asyncio.gather(held, return_exceptions=True)  # alice's request died with that router
                router = Router(config.router)
                await router.start("127.0.0.1", port)
                await asyncio.wait_for(agent.online.wait(), 10)
                status, reply = await offer(bob, bob_peer)  # request 1 on the new router
                assert status == 200, reply
                await bob_peer.accept(reply["data"]["sdp"])
                await bob_peer.connected()  # only bob's own answer can connect bob's peer
            for peer in (alice_peer, bob_peer):
                await peer.close()
            await agent.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await router.stop()

        run(main())


def test_pam_gateway_refuses_a_config_others_can_read_in_one_line(tmp_path):
    data = make_config()
    path = tmp_path / "shared.toml"
    path.write_text(reliability.to_toml(data))
    path.chmod(0o644)
    result = subprocess.run([sys.executable, "-m", "commander_pam_plugin.gateway", "serve", "--config", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and f"chmod 600 {path}" in result.stderr
    assert not any(u["token"] in result.stderr for u in data["users"])
