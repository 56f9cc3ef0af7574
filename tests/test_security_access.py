"""Access: who may do what, at the router and again at the gateway; tokens; private files."""
from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import reliability  # noqa: E402
import aiohttp  # noqa: E402
from aiohttp.test_utils import make_mocked_request  # noqa: E402
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


def _compared_tokens(compare, tokens: set[bytes]) -> list[bytes]:
    """The known tokens compare_digest was asked about, in call order."""
    return [call.args[1] for call in compare.call_args_list if call.args[1] in tokens]


def test_tokens_are_compared_in_constant_time(mocker):
    """Every user token is compared, with compare_digest, whichever position the presented one has
    (first, middle, last) and when it matches none: the loop never stops at the first match."""
    data = make_config(users=("alice", "bob", "carol", "dave"))
    config = config_from_dict(data)
    tokens = [u["token"] for u in data["users"]]
    known = {t.encode() for t in tokens}
    compare = mocker.spy(router_module.hmac, "compare_digest")

    async def main():
        router = Router(config.router)
        url = await router.start("127.0.0.1", 0)
        seen = {}
        try:
            for presented in [*tokens, "not-anyones-token-at-all", tokens[0][:-1] + "x"]:
                compare.reset_mock()
                async with RouterClient(url, presented) as client:
                    status, payload, headers = await client.request("GET", "/api/v1/resources")
                seen[presented] = (status, _compared_tokens(compare, known))
                if status == 401:
                    refusals.append((payload, {k.lower(): v for k, v in headers.items()}))
        finally:
            await router.stop()
        return router, seen

    refusals: list[tuple[dict, dict]] = []
    router, seen = run(main())
    assert len(refusals) == 2
    for payload, headers in refusals:  # a refusal says what and how to authenticate (header names are case-free)
        assert payload["error"]["message"] == "invalid token" and headers["www-authenticate"] == "Bearer"
    for position, token in enumerate(tokens):
        status, compared = seen[token]
        assert status == 200, f"user {position}'s own token was refused"
        assert sorted(compared) == sorted(known), f"token in position {position}: only {len(compared)} compared"
    for wrong in ("not-anyones-token-at-all", tokens[0][:-1] + "x"):
        status, compared = seen[wrong]
        assert status == 401 and sorted(compared) == sorted(known)
    for user in data["users"]:  # and the match names its own user, wherever it sits in the list
        request = make_mocked_request("GET", "/api/v1/resources", headers={"Authorization": f"Bearer {user['token']}"})
        assert router._user(request) == user["name"]


def test_gateway_tokens_are_compared_in_constant_time(mocker, caplog):
    """The gateway link's token check, too: every known gateway token, right or wrong presented."""
    data = make_config()
    config = config_from_dict(data)
    tokens = [data["gateway"]["token"], *(g["token"] for g in data["gateways"])]
    known = {t.encode() for t in tokens}
    assert len(known) >= 2
    compare = mocker.spy(router_module.hmac, "compare_digest")

    async def main():
        router = Router(config.router)
        url = await router.start("127.0.0.1", 0)
        seen = {}
        try:
            async with aiohttp.ClientSession() as http:
                for presented in [*tokens, "not-a-gateway-token-at-all", None]:
                    compare.reset_mock()
                    headers = {"Authorization": f"Bearer {presented}"} if presented else {}
                    async with http.ws_connect(url + "/api/v1/gateway/connect", headers=headers) as ws:
                        if presented not in tokens:
                            closing = await ws.receive()  # the refusal closes it, saying why
                            closes.append((ws.close_code, closing.extra))
                    seen[presented] = _compared_tokens(compare, known)
        finally:
            await router.stop()
        return seen

    closes: list[tuple[int | None, str]] = []
    with caplog.at_level(logging.WARNING, logger="commander_pam_plugin.gateway.router"):
        seen = run(main())
    for position, presented in enumerate([*tokens, "not-a-gateway-token-at-all", None]):
        assert sorted(seen[presented]) == sorted(known), f"gateway token in position {position}"
    assert closes == [(router_module.CLOSE_BAD_CREDENTIALS, "bad gateway token")] * 2  # wrong, then none
    refused = [r.getMessage() for r in caplog.records if "refused a gateway connection" in r.getMessage()]
    assert refused == ["router: refused a gateway connection from 127.0.0.1 (bad token)"] * 2


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
