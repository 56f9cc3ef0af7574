"""Real parts for scale-out tests and benchmarks: a private redis-server, router nodes in their
own processes, gateway agents on a background loop.

RedisServer runs Debian's redis-server on 127.0.0.1 on a free port with a temp dir (nothing
persisted) and can be killed and restarted on the same port. RouterNode runs `pam-gateway
router` with a [router] state URL in a subprocess, so killing it is a real process death.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from gateway_support import ClientPeer, EchoServer, RouterClient, Session, new_conversation_id, new_token

from commander_pam_plugin.gateway.agent import GatewayAgent
from commander_pam_plugin.gateway.config import config_from_dict
from commander_pam_plugin.gateway.embedded import LoopThread

WAIT = 15.0  # safety net for every wait; never a timing claim


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_port(port: int, timeout: float, process: subprocess.Popen[Any] | None = None) -> None:
    """Until something accepts on 127.0.0.1:port (polls a real connect; the process may die)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")
            time.sleep(0.02)


class RedisServer:
    """A private redis-server: 127.0.0.1 only, no persistence, its own temp dir."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="pam-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir, "--save", "",
             "--appendonly", "no", "--protected-mode", "yes", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, WAIT, self.process)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(WAIT)
        self.process = None

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_config(directory: Path, name: str, data: dict[str, Any]) -> Path:
    """A TOML config file, mode 0600 (it holds tokens)."""
    path = directory / f"{name}.toml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(_toml(data))
    return path


def _toml(data: dict[str, Any]) -> str:
    """Just enough TOML for these configs: tables, arrays of tables, strings, numbers, lists."""
    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, (int, float)):
            return repr(item)
        if isinstance(item, str):
            return '"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(item, (list, tuple)):
            return "[" + ", ".join(value(i) for i in item) + "]"
        raise TypeError(type(item))

    def table(items: dict[str, Any]) -> list[str]:
        return [f"{k} = {value(v)}" for k, v in items.items() if v is not None]

    lines: list[str] = []
    for key, item in data.items():
        if isinstance(item, dict):
            lines += [f"[{key}]", *table(item), ""]
        elif isinstance(item, list) and item and isinstance(item[0], dict):
            for entry in item:
                lines += [f"[[{key}]]", *table(entry), ""]
    return "\n".join(lines)


class RouterNode:
    """`pam-gateway router` in its own process, sharing state through Redis."""

    def __init__(self, directory: Path, name: str, router_config: dict[str, Any], redis_url: str | None) -> None:
        self.name, self.port = name, free_port()
        config = {k: v for k, v in router_config.items() if k != "router"}
        config["router"] = {**router_config.get("router", {}), "listen": f"127.0.0.1:{self.port}",
                            "node": name, "state": redis_url}
        self.path = write_config(directory, f"router-{name}", config)
        self.log = directory / f"router-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RouterNode:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "commander_pam_plugin.gateway", "router",
                                             "--config", str(self.path)], stdout=log, stderr=log)
        _wait_port(self.port, WAIT, self.process)
        return self

    def kill(self) -> None:
        """SIGKILL: the node dies without saying goodbye (no withdraw, no key deleted)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(WAIT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(WAIT)


class Gateways:
    """Gateway agents on one background loop, each dialling its list of router nodes."""

    def __init__(self) -> None:
        self.thread = LoopThread("scaleout-gateways").start()
        self.agents: dict[str, GatewayAgent] = {}
        self.tasks: dict[str, Any] = {}

    def start(self, config: dict[str, Any], router_urls: Sequence[str]) -> GatewayAgent:
        settings = config_from_dict(config, "<scaleout gateway>").gateway
        assert settings is not None

        async def go() -> GatewayAgent:
            agent = GatewayAgent(settings, list(router_urls))
            self.tasks[settings.name] = asyncio.ensure_future(agent.run())
            await asyncio.wait_for(agent.online.wait(), WAIT)
            return agent

        agent = self.thread.run(go(), WAIT + 5)
        self.agents[settings.name] = agent
        return agent

    def wait_online(self, name: str, timeout: float = WAIT) -> str:
        """Wait until the agent is welcomed again; returns the router URL it is linked to."""
        agent = self.agents[name]

        async def go() -> str:
            await asyncio.wait_for(agent.online.wait(), timeout)
            return agent.router_url

        return self.thread.run(go(), timeout + 5)

    def wait_offline(self, name: str, timeout: float = WAIT) -> None:
        agent = self.agents[name]
        self.thread.run(asyncio.wait_for(agent.offline.wait(), timeout), timeout + 5)

    def kill(self, name: str) -> None:
        """The gateway process dies: its sessions and its link go with it, abruptly."""
        agent = self.agents.pop(name)

        async def go() -> None:
            task = self.tasks.pop(name)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.gather(*(s.close("killed", "failed") for s in list(agent.sessions.values())),
                                 return_exceptions=True)

        self.thread.run(go(), WAIT)

    def sessions(self, name: str) -> int:
        return len(self.agents[name].sessions)

    def stop(self) -> None:
        async def go() -> None:
            await asyncio.gather(*(a.stop() for a in self.agents.values()), return_exceptions=True)
            for task in self.tasks.values():
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)

        self.thread.run(go(), 30)
        self.thread.stop()


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

    def gateway(self, name: str, nodes: list[str], also_announce: tuple[str, ...] = ()) -> Any:
        """A gateway announcing what the config lets it serve, plus `also_announce` (not permitted)."""
        config = {"gateway": {"name": name, "token": self.gateway_tokens[name], "host_addresses": ["127.0.0.1"]},
                  "resources": [{"name": r, "kind": "tcp", "host": "127.0.0.1", "port": self.echo.port}
                                for r in self.served[name] + list(also_announce)]}
        return self.gateways.start(config, [self.nodes[n].url for n in nodes])

    def client(self, node: str, user: str = "alice") -> RouterClient:
        return RouterClient(self.nodes[node].url, self.users[user])

    def close(self) -> None:
        self.gateways.stop()
        for node in self.nodes.values():
            node.stop()
        self.redis.stop()


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


async def connect_by_resource(client: RouterClient, resource: str, actions: RouterClient | None = None
                              ) -> tuple[str, Session]:
    """A full trickle connect addressed by resource (the router picks the pool member), the stream
    on `client`'s node and every action on `actions`' (no stickiness); (gateway, session)."""
    actions = actions or client
    conversation_id = new_conversation_id()
    stream = await client.stream(conversation_id)
    peer = ClientPeer()
    offer = {"type": "offer", "sdp": await peer.offer(), "resource": resource, "session": {"mode": "tunnel"}}
    status, reply, _ = await actions.request("POST", f"/api/v1/resources/{resource}/actions", body=json.dumps(
        {"conversation_id": conversation_id, "kind": "offer", "data": offer, "trickle_ice": True}).encode())
    assert status == 200, reply
    answer = (await stream.wait_for("answer"))["sdp"]
    await peer.accept(answer)
    await peer.connected()
    await stream.wait_for("state", state="connected")
    return reply["gateway"]["name"], Session(conversation_id, peer, stream)
