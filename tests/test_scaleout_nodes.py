"""Several router nodes sharing one Redis: real redis-server, router processes, gateway agents
and aiortc peers. A node or Redis dies for real (SIGKILL); tunnels and new connects carry on.
"""
from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from gateway_support import EchoServer, RouterClient, connect, run
from scaleout_support import Cluster, checked_echo, connect_by_resource

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (.ci/run installs it)")

@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with EchoServer() as echo:
        made = Cluster(tmp_path, echo, {"echo": ["gw-b"]})
        try:
            yield made
        finally:
            made.close()


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
            _, session = await connect_by_resource(streams, "echo", actions)
            await checked_echo(session, 2)
            # another user naming that conversation on yet another node is refused: owners are shared
            async with RouterClient(cluster.nodes["b"].url, cluster.users["bob"]) as bob:
                status, payload = await bob.action("gw-b", session.conversation_id, "close")
                assert status == 403, payload
            await checked_echo(session, 4)  # bob's attempt did not close it

    run(main(), timeout=60)


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


def test_nothing_stays_bound_to_a_dead_node(cluster: Cluster) -> None:
    import redis

    cluster.router_config["router"] = {"state_ttl": 1.5}
    for name in "ab":
        cluster.node(name)
    cluster.gateway("gw-b", ["b"])  # b only: once b dies it cannot relink

    async def main() -> None:
        async with cluster.client("b") as on_b, cluster.client("a") as on_a:
            session = await connect(on_b, "gw-b", "echo", trickle=True)  # homed on b
            store = redis.Redis.from_url(cluster.redis.url)
            assert store.exists("pam:node:b", "pam:gw:gw-b", f"pam:conv:{session.conversation_id}") == 3

            await asyncio.to_thread(cluster.nodes["b"].kill)  # no goodbye: nothing is deleted
            deadline = time.monotonic() + 15  # a bound against a hang; state_ttl is 1.5 s
            while store.exists("pam:node:b", "pam:gw:gw-b", f"pam:conv:{session.conversation_id}") \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert store.exists("pam:node:b", "pam:gw:gw-b", f"pam:conv:{session.conversation_id}") == 0
            status, payload = await on_a.action("gw-b", None, "ping")
            assert status == 503 and payload["error"]["code"] == "gateway_offline", payload
            await checked_echo(session, 2)  # the peer still does not care
            store.close()

    run(main(), timeout=60)
