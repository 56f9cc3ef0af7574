"""Several router nodes sharing one Redis: real redis-server, router processes, gateway agents
and aiortc peers. A node or Redis dies for real (SIGKILL); tunnels and new connects carry on.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from gateway_support import EchoServer, RouterClient, connect, new_token, run
from scaleout_support import Gateways, RedisServer, RouterNode

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/redis-server") and not __import__("shutil").which(
    "redis-server"), reason="redis-server is not installed (.ci/run installs it)")

USERS = ("alice", "bob")


class Cluster:
    """Redis, router nodes a/b/c, and gateway agents; the config every part shares."""

    def __init__(self, tmp: Path, echo: EchoServer, pools: dict[str, list[str]]) -> None:
        self.tmp, self.echo = tmp, echo
        self.users = {u: new_token() for u in USERS}
        self.gateway_tokens = {g: new_token() for names in pools.values() for g in names}
        served: dict[str, list[str]] = {}
        for resource, names in pools.items():
            for name in names:
                served.setdefault(name, []).append(resource)
        self.served = served
        self.router_config = {"users": [{"name": u, "token": t} for u, t in self.users.items()],
                              "gateways": [{"name": g, "token": t, "resources": served[g]}
                                           for g, t in self.gateway_tokens.items()]}
        self.redis = RedisServer().start()
        self.nodes: dict[str, RouterNode] = {}
        self.gateways = Gateways()

    def node(self, name: str) -> RouterNode:
        node = self.nodes[name] = RouterNode(self.tmp, name, self.router_config, self.redis.url).start()
        return node

    def gateway(self, name: str, nodes: list[str]) -> Any:
        config = {"gateway": {"name": name, "token": self.gateway_tokens[name], "host_addresses": ["127.0.0.1"]},
                  "resources": [{"name": r, "kind": "tcp", "host": "127.0.0.1", "port": self.echo.port}
                                for r in self.served[name]]}
        return self.gateways.start(config, [self.nodes[n].url for n in nodes])

    def client(self, node: str, user: str = "alice") -> RouterClient:
        return RouterClient(self.nodes[node].url, self.users[user])

    def close(self) -> None:
        self.gateways.stop()
        for node in self.nodes.values():
            node.stop()
        self.redis.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with EchoServer() as echo:
        made = Cluster(tmp_path, echo, {"echo": ["gw-b"]})
        try:
            yield made
        finally:
            made.close()


async def checked_echo(session: Any, stream_id: int, size: int = 256 * 1024) -> None:
    """`size` random bytes through one tunnel connection to the echo target; sha256 must match."""
    payload = os.urandom(size)
    channel, reply = await session.peer.open_stream(stream_id)
    assert reply["op"] == "opened", reply
    for offset in range(0, size, 16384):
        channel.send(payload[offset:offset + 16384])
    received = bytearray()
    while len(received) < size:
        item = await channel.receive()
        assert isinstance(item, bytes), item
        received += item
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()
    channel.channel.close()


async def until_ok(attempt: Any, bound: float) -> Any:
    """Retry `attempt()` (returns (status, payload)) until 200; the bound only stops a hang."""
    deadline = time.monotonic() + bound
    while True:
        status, payload = await attempt()
        if status == 200 or time.monotonic() > deadline:
            return status, payload
        await asyncio.sleep(0.1)


def test_a_client_on_node_a_tunnels_to_a_gateway_on_node_b_and_survives_b_dying(cluster: Cluster) -> None:
    for name in "abc":
        cluster.node(name)
    agent = cluster.gateway("gw-b", ["b", "c"])
    assert agent.router_url == cluster.nodes["b"].url

    async def main() -> None:
        async with cluster.client("a") as client:
            session = await connect(client, "gw-b", "echo", trickle=True)  # answer and state cross nodes
            await checked_echo(session, 2)

            await asyncio.to_thread(cluster.nodes["b"].kill)
            relinked = await asyncio.to_thread(cluster.gateways.wait_online, "gw-b")
            assert relinked == cluster.nodes["c"].url
            await checked_echo(session, 4)  # the established tunnel never noticed

            started = time.monotonic()
            second = await connect(client, "gw-b", "echo", trickle=True)  # right away: no retry needed
            assert time.monotonic() - started < 10  # a bound against a hang, not a timing claim
            await checked_echo(second, 2)
            await checked_echo(session, 6)
            await second.close(client, "gw-b")
            await session.close(client, "gw-b")

    run(main(), timeout=90)


def test_any_node_answers_any_request_stream_on_one_node_actions_on_another(cluster: Cluster) -> None:
    for name in "abc":
        cluster.node(name)
    cluster.gateway("gw-b", ["b"])

    async def main() -> None:
        async with cluster.client("a") as streams, cluster.client("c") as actions:
            # connect() opens the stream with one client and posts with the same one; do it by hand:
            session = await connect_split(streams, actions, "echo")
            await checked_echo(session, 2)
            # another user naming that conversation on yet another node is refused: owners are shared
            async with RouterClient(cluster.nodes["b"].url, cluster.users["bob"]) as bob:
                status, payload = await bob.action("gw-b", session.conversation_id, "close")
                assert status == 403, payload
            await checked_echo(session, 4)  # bob's attempt did not close it

    run(main(), timeout=60)


async def connect_split(streams: RouterClient, actions: RouterClient, resource: str) -> Any:
    """The stream on one node, every action on another (a load balancer with no stickiness)."""
    from gateway_support import ClientPeer, Session, new_conversation_id

    conversation_id = new_conversation_id()
    stream = await streams.stream(conversation_id)
    peer = ClientPeer()
    offer = {"type": "offer", "sdp": await peer.offer(), "resource": resource, "session": {"mode": "tunnel"}}
    status, reply, _ = await actions.request("POST", f"/api/v1/resources/{resource}/actions", body=_json(
        {"conversation_id": conversation_id, "kind": "offer", "data": offer, "trickle_ice": True}))
    assert status == 200, reply
    assert reply["data"].get("accepted"), reply
    answer = (await stream.wait_for("answer"))["sdp"]
    await peer.accept(answer)
    await peer.connected()
    await stream.wait_for("state", state="connected")
    return Session(conversation_id, peer, stream)


def _json(value: Any) -> bytes:
    import json
    return json.dumps(value).encode()


def test_redis_killed_and_restarted_new_connects_work_again_without_restarting_a_router(cluster: Cluster) -> None:
    for name in "ab":
        cluster.node(name)
    cluster.gateway("gw-b", ["b"])

    async def main() -> None:
        async with cluster.client("a") as client:
            session = await connect(client, "gw-b", "echo", trickle=True)
            await checked_echo(session, 2)

            await asyncio.to_thread(cluster.redis.kill)
            status, payload = await client.action("gw-b", None, "ping")
            assert status == 503, payload  # one clear line, not a hang or a 500
            assert "router state unavailable" in payload["error"]["message"] or "offline" in payload["error"]["message"]
            await checked_echo(session, 4)  # peers do not need Redis either

            await asyncio.to_thread(cluster.redis.start)  # same port, empty: the nodes rewrite their keys
            status, payload = await until_ok(lambda: client.action("gw-b", None, "ping"), 30)
            assert status == 200, payload
            second = await connect(client, "gw-b", "echo", trickle=True)
            await checked_echo(second, 2)
            await second.close(client, "gw-b")
            await session.close(client, "gw-b")

    run(main(), timeout=90)
