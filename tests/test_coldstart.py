"""Cold start: a fresh client connects in one signaling round trip, its offer addressed by resource.

A real router and three real gateway agents on 127.0.0.1, real HTTP and WebSocket, real aiortc
peers and a real TCP echo target. gw-a and gw-b announce their resources in their hello (both
serve "shared"); gw-old is a gateway from before announcements (its hello has no "resources"),
so the router must ask it on every listing and never route to it by resource.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from commander_pam_plugin.config import PamConfig
from commander_pam_plugin.errors import PamError
from commander_pam_plugin.gateway.agent import GatewayAgent
from commander_pam_plugin.gateway.config import config_from_dict
from commander_pam_plugin.gateway.embedded import LoopThread
from commander_pam_plugin.gateway.router import CLOSE_BAD_HELLO, Router
from commander_pam_plugin.runtime import PamRuntime
from gateway_support import WAIT, ClientPeer, EchoServer, RouterClient, new_conversation_id, new_token, run

LIST = "GET /api/v1/resources"
BY_RESOURCE = "POST /api/v1/resources/{resource}/actions"
BY_GATEWAY = "POST /api/v1/gateways/{gateway}/actions"


class SilentAgent(GatewayAgent):
    """A gateway from before resource announcements: its hello carries no "resources"."""

    def hello(self) -> dict[str, Any]:
        hello = super().hello()
        del hello["resources"]
        return hello


@dataclass
class Fleet:
    """The running router and gateways, the user tokens, and every resources action sent to a gateway."""

    thread: LoopThread
    router: Router
    url: str
    tokens: dict[str, str]
    spare_token: str  # a known gateway identity that never connects (for raw hellos)
    listed: Counter[str]  # gateway -> `resources` actions the router sent it (fan-out)

    def counts(self) -> tuple[Counter[str], Counter[str]]:
        """(HTTP requests per route, fan-out per gateway), read on the router's loop."""
        async def snapshot() -> tuple[Counter[str], Counter[str]]:
            return Counter(self.router.requests), Counter(self.listed)
        return self.thread.run(snapshot(), WAIT)

    def runtime(self, user: str = "alice") -> PamRuntime:
        return PamRuntime(PamConfig(router_url=self.url, token=self.tokens[user], host_addresses=("127.0.0.1",)))


def _gateway(name: str, resources: list[dict[str, Any]], users: list[dict[str, str]]) -> Any:
    return config_from_dict({"users": users, "gateway": {"name": name, "token": new_token()},
                             "resources": resources}).gateway


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with EchoServer() as echo:
        tcp = {"kind": "tcp", "host": "127.0.0.1", "port": echo.port}
        users = [{"name": name, "token": new_token()} for name in ("alice", "bob", "carol")]
        gateways = {"gw-a": _gateway("gw-a", [{"name": "echo", **tcp}, {"name": "shared", **tcp},
                                              {"name": "secret", "users": ["bob"], **tcp}], users),
                    "gw-b": _gateway("gw-b", [{"name": "shared", **tcp}], users),
                    "gw-old": _gateway("gw-old", [{"name": "old-echo", **tcp}], users)}
        spare = new_token()
        identities = [{"name": g.name, "token": g.token} for g in gateways.values()]
        settings = config_from_dict({"users": users,
                                     "gateways": [*identities, {"name": "gw-spare", "token": spare}]}).router
        listed: Counter[str] = Counter()
        thread = LoopThread("coldstart").start()
        router = Router(settings)

        def observe(gateway: str, direction: str, frame: str) -> None:
            message = json.loads(frame)
            if direction == "out" and message.get("kind") == "resources":
                listed[gateway] += 1

        router.observe(observe)
        agents: list[GatewayAgent] = []

        async def start() -> tuple[str, list[asyncio.Future[None]]]:
            url = await router.start("127.0.0.1", 0)
            agents.extend([GatewayAgent(gateways["gw-a"], url), GatewayAgent(gateways["gw-b"], url),
                           SilentAgent(gateways["gw-old"], url)])
            tasks = [asyncio.ensure_future(agent.run()) for agent in agents]
            await asyncio.gather(*(asyncio.wait_for(agent.online.wait(), WAIT) for agent in agents))
            return url, tasks

        async def stop(tasks: list[asyncio.Future[None]]) -> None:
            await asyncio.gather(*(agent.stop() for agent in agents))
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await router.stop()

        url, tasks = thread.run(start(), WAIT * 2)
        try:
            yield Fleet(thread, router, url, {u["name"]: u["token"] for u in users}, spare, listed)
        finally:
            thread.run(stop(tasks), WAIT * 3)
            thread.stop()


def _echo(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def _tunnel_echo(runtime: PamRuntime, resource: str) -> str:
    """`pam tunnel start RESOURCE` from this runtime, one echo through it; the gateway it went through."""
    tunnel = runtime.start_tunnel(None, runtime.resolve(None, resource), "127.0.0.1", 0, trickle=True)
    try:
        assert _echo(tunnel.port, b"cold start") == b"cold start"
        return tunnel.gateway
    finally:
        runtime.stop_tunnel(tunnel.id)


def _ping(fleet: Fleet, user: str, resource: str) -> tuple[int, Any]:
    """A no-op action addressed by resource, as `user`."""
    async def main() -> tuple[int, Any]:
        async with RouterClient(fleet.url, fleet.tokens[user]) as client:
            body = json.dumps({"kind": "ping", "data": {}, "trickle_ice": False}).encode()
            status, payload, _ = await client.request("POST", f"/api/v1/resources/{resource}/actions", body=body)
            return status, payload
    return run(main())


def _listing(fleet: Fleet, user: str) -> list[dict[str, str]]:
    async def main() -> Any:
        async with RouterClient(fleet.url, fleet.tokens[user]) as client:
            return await client.get("/api/v1/resources")
    status, payload = run(main())
    assert status == 200, payload
    return payload["resources"]


def test_a_cold_client_connects_without_listing_and_learns_the_gateway(fleet: Fleet) -> None:
    runtime = fleet.runtime()
    try:
        requests_before, listed_before = fleet.counts()
        ref = runtime.resolve(None, "echo")
        assert ref.gateway is None and ref.kind is None  # nothing fetched to resolve it
        assert _tunnel_echo(runtime, "echo") == "gw-a"  # learnt from the offer's reply
        requests_after, listed_after = fleet.counts()
    finally:
        runtime.shutdown()
    assert requests_after[LIST] == requests_before[LIST]
    assert listed_after == listed_before  # no gateway was asked for its resources
    assert requests_after[BY_RESOURCE] - requests_before[BY_RESOURCE] == 1  # the offer, and only it
    assert requests_after[BY_GATEWAY] - requests_before[BY_GATEWAY] >= 1  # later actions name the gateway


def test_unknown_resource_is_404_with_the_names_the_user_may_use(fleet: Fleet) -> None:
    status, payload = _ping(fleet, "alice", "nosuch")
    assert status == 404, payload
    assert payload["error"]["message"] == "unknown resource nosuch; resources you may use: echo, shared"
    status, payload = _ping(fleet, "alice", "echo")
    assert status == 200 and payload["data"] == {"pong": True}, payload
    assert payload["gateway"]["name"] == "gw-a" and "trickle" in payload["gateway"]["capabilities"]


def test_a_resource_on_two_gateways_is_409_naming_both(fleet: Fleet) -> None:
    status, payload = _ping(fleet, "alice", "shared")
    assert status == 409, payload
    assert payload["error"]["message"] == "resource shared is served by several gateways: gw-a, gw-b; resolve it to one"
    runtime = fleet.runtime()
    try:
        with pytest.raises(PamError, match="served by several gateways: gw-a, gw-b"):
            _tunnel_echo(runtime, "shared")
    finally:
        runtime.shutdown()


def test_a_user_outside_the_allow_list_gets_the_unknown_resource_404(fleet: Fleet) -> None:
    status, payload = _ping(fleet, "alice", "secret")
    assert status == 404, payload
    assert payload["error"]["message"] == "unknown resource secret; resources you may use: echo, shared"
    assert "secret" not in {r["name"] for r in _listing(fleet, "alice")}
    status, payload = _ping(fleet, "bob", "secret")
    assert status == 200 and payload["gateway"]["name"] == "gw-a", payload
    assert {"name": "secret", "kind": "tcp", "gateway": "gw-a"} in _listing(fleet, "bob")


def test_listing_asks_only_the_gateway_that_did_not_announce(fleet: Fleet) -> None:
    _, listed_before = fleet.counts()
    assert _listing(fleet, "alice") == [{"name": "echo", "kind": "tcp", "gateway": "gw-a"},
                                        {"name": "shared", "kind": "tcp", "gateway": "gw-a"},
                                        {"name": "shared", "kind": "tcp", "gateway": "gw-b"},
                                        {"name": "old-echo", "kind": "tcp", "gateway": "gw-old"}]
    _, listed_after = fleet.counts()
    assert listed_after - listed_before == Counter({"gw-old": 1})


def test_a_gateway_that_did_not_announce_still_serves(fleet: Fleet) -> None:
    status, payload = _ping(fleet, "alice", "old-echo")
    assert status == 404, payload  # only announcing gateways are routed to by resource
    runtime = fleet.runtime()
    try:
        assert _tunnel_echo(runtime, "old-echo") == "gw-old"  # found in the list, then the gateway route
    finally:
        runtime.shutdown()


def test_an_offer_for_another_resource_than_its_route_is_refused(fleet: Fleet) -> None:
    async def main() -> tuple[int, Any]:
        peer = ClientPeer()
        try:
            offer = {"type": "offer", "sdp": await peer.offer(), "resource": "shared", "session": {"mode": "tunnel"}}
            body = json.dumps({"conversation_id": new_conversation_id(), "kind": "offer", "data": offer}).encode()
            async with RouterClient(fleet.url, fleet.tokens["alice"]) as client:
                status, payload, _ = await client.request("POST", "/api/v1/resources/echo/actions", body=body)
                return status, payload
        finally:
            await peer.close()
    status, payload = run(main())
    assert status == 400 and "names resource shared but was sent to resource echo" in payload["error"]["message"]


def test_a_hello_is_refused_if_its_resources_are_not_a_list_and_bad_entries_are_skipped(fleet: Fleet) -> None:
    async def hello(http: aiohttp.ClientSession, resources: Any) -> aiohttp.ClientWebSocketResponse:
        ws = await http.ws_connect(f"{fleet.url}/api/v1/gateway/connect",
                                   headers={"Authorization": f"Bearer {fleet.spare_token}"})
        await ws.send_json({"type": "hello", "gateway": "gw-spare", "version": "1.8.0", "capabilities": [],
                            "resources": resources})
        return ws

    async def main() -> tuple[int | None, Any]:
        async with aiohttp.ClientSession() as http:
            refused = await hello(http, "echo")
            await refused.receive()
            # Only carol may use what gw-spare announces, so the other tests never see it.
            welcomed = await hello(http, [{"name": "../etc", "kind": "tcp", "users": None}, "junk",
                                          {"name": "spare", "kind": "tcp", "users": "carol"},
                                          {"name": "carols", "kind": "tcp", "users": ["carol"]}])
            assert json.loads((await welcomed.receive()).data) == {"type": "welcome"}
            async with RouterClient(fleet.url, fleet.tokens["carol"]) as carol:
                listing = await carol.get("/api/v1/resources")
            await welcomed.close()
            return refused.close_code, listing

    code, (status, payload) = run(main())
    assert code == CLOSE_BAD_HELLO
    assert status == 200 and [r for r in payload["resources"] if r["gateway"] == "gw-spare"] == [
        {"name": "carols", "kind": "tcp", "gateway": "gw-spare"}]


def test_pam_tunnel_start_of_an_unknown_resource_is_one_line(fleet: Fleet, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAM_")}
    env.update(HOME=str(tmp_path), PAM_ROUTER_URL=fleet.url, PAM_TOKEN=fleet.tokens["alice"])
    result = subprocess.run([sys.executable, "-m", "commander_pam_plugin.shell", "pam", "tunnel", "start", "nosuch"],
                            stdin=subprocess.DEVNULL, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        "error: unknown resource 'nosuch'; resources you may use: echo, old-echo, shared"], result.stderr
