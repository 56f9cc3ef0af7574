"""Clients with several router URLs, tunnels that outlive every router, and resource pools.
Real redis-server, router processes, gateway agents, the plugin's own runtime and aiortc peers.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest
from gateway_support import EchoServer, run
from scaleout_support import WAIT, Cluster, checked_echo, connect_by_resource

from commander_pam_plugin.config import PamConfig
from commander_pam_plugin.runtime import PamRuntime

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (.ci/run installs it)")


def sha_echo(port: int, size: int = 128 * 1024) -> None:
    """`size` random bytes through a local tunnel port to the echo target and back, sha256-checked."""
    payload = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(payload)
        received = bytearray()
        while len(received) < size:
            chunk = sock.recv(65536)
            assert chunk, f"the tunnel closed after {len(received)} bytes"
            received += chunk
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server


def test_a_client_moves_to_the_next_router_url_and_its_tunnels_outlive_every_router(tmp_path: Path,
                                                                                      echo: EchoServer) -> None:
    cluster = Cluster(tmp_path, echo, {"echo": ["gw-1"]})
    runtime = None
    try:
        a, b = cluster.node("a"), cluster.node("b")
        cluster.gateway("gw-1", ["b"])
        runtime = PamRuntime(PamConfig(router_url=f"{a.url},{b.url}", token=cluster.users["alice"],
                                       host_addresses=("127.0.0.1",)))
        first = runtime.start_tunnel(None, runtime.resolve(None, "echo"), "127.0.0.1", 0, trickle=True)
        sha_echo(first.port)

        a.kill()  # the client's node
        sha_echo(first.port)  # the peer never needed it
        second = runtime.start_tunnel(None, runtime.resolve(None, "echo"), "127.0.0.1", 0, trickle=True)
        sha_echo(second.port)  # negotiated through b

        b.kill()  # now no router is left at all
        sha_echo(first.port)
        sha_echo(second.port)
    finally:
        if runtime is not None:
            runtime.shutdown()
        cluster.close()


def test_a_pool_spreads_offers_and_a_killed_gateway_leaves_it(tmp_path: Path, echo: EchoServer) -> None:
    cluster = Cluster(tmp_path, echo, {"echo": ["gw-1", "gw-2"], "other": ["gw-3"]})
    try:
        for name in "ab":
            cluster.node(name)
        cluster.gateway("gw-1", ["a"])
        cluster.gateway("gw-2", ["b"])
        cluster.gateway("gw-3", ["a"], also_announce=("echo",))  # not in echo's pool: the config says so

        listing = pam_resources(cluster, "b")  # the real shell and plugin, on another node
        assert listing == [["NAME", "KIND", "GATEWAY", "POOL"], ["echo", "tcp", "gw-1", "2"], ["echo", "tcp", "gw-2", "2"],
                           ["other", "tcp", "gw-3", "1"]], listing  # gw-3 announced echo: refused

        async def main() -> None:
            async with cluster.client("a") as client:
                sessions = [await connect_by_resource(client, "echo") for _ in range(4)]
                used = Counter(gateway for gateway, _ in sessions)
                assert set(used) == {"gw-1", "gw-2"}, used  # least open sessions: both get offers
                assert max(used.values()) - min(used.values()) <= 1, used  # ...and evenly
                for _, session in sessions:
                    await checked_echo(session, 2, 32 * 1024)

                await asyncio.to_thread(cluster.gateways.kill, "gw-2")  # mid-run
                for _ in range(4):
                    gateway, session = await connect_by_resource(client, "echo")
                    assert gateway == "gw-1"  # the dead one left the pool at once (its link closed)
                    await checked_echo(session, 2, 32 * 1024)
                for gateway, session in sessions:
                    if gateway == "gw-1":
                        await checked_echo(session, 4, 32 * 1024)  # the survivor's tunnels carry on

            assert not cluster.gateways.agents["gw-3"].applied_candidates  # never offered "echo" (nor anything)
        run(main(), timeout=120)
    finally:
        cluster.close()


def pam_resources(cluster: Cluster, node: str) -> list[list[str]]:
    """`pam resources` in commander-shell as alice, through one router node; its rows, split."""
    home = cluster.tmp / "home"  # no ~/.config/commander-pam of the machine's user
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAM_")}
    env.update({"HOME": str(home), "PAM_ROUTER_URL": cluster.nodes[node].url, "PAM_TOKEN": cluster.users["alice"]})
    shell = str(Path(sys.executable).with_name("commander-shell"))
    done = subprocess.run([shell, "-c", "pam resources"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [line.split() for line in done.stdout.splitlines() if line.strip()]
