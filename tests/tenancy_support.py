"""Helpers for the tenancy tests: a second (hostile) gateway, raw HTTP, and an honest tunnel.

Everything here is real: the hostile gateway is a GatewayAgent with a valid token, raw
requests go over a TCP socket to the live router, and the honest tunnel echoes bytes through
aiortc data channels and a TCP echo target.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from gateway_support import WAIT, EchoServer, Session, new_token

from commander_pam_plugin.gateway.agent import GatewayAgent
from commander_pam_plugin.gateway.config import GatewaySettings, config_from_dict
from commander_pam_plugin.gateway.embedded import EmbeddedGateway


def echo_resource(echo: EchoServer, name: str = "echo", **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": "tcp", "host": "127.0.0.1", "port": echo.port, **extra}


def gateway_settings(name: str, token: str, resources: list[dict[str, Any]]) -> GatewaySettings:
    """The settings of a gateway process of its own (as `pam-gateway agent` would read them)."""
    settings = config_from_dict({"users": [{"name": "nobody", "token": new_token()}],
                                 "gateway": {"name": name, "token": token}, "resources": resources}).gateway
    assert settings is not None
    return settings


class ExtraAgent:
    """A GatewayAgent on an EmbeddedGateway's loop, dialling its router (a second gateway)."""

    def __init__(self, stack: EmbeddedGateway, settings: GatewaySettings) -> None:
        self.stack, self.settings = stack, settings
        self.agent: GatewayAgent | None = None
        self._task: asyncio.Future[None] | None = None

    def start(self) -> GatewayAgent:
        async def start() -> GatewayAgent:
            agent = GatewayAgent(self.settings, self.stack.router_url)
            self._task = asyncio.ensure_future(agent.run())
            await asyncio.wait_for(agent.online.wait(), WAIT)
            return agent
        self.agent = self.stack.run(start(), WAIT + 5)
        return self.agent

    def kill(self) -> None:
        """End the router link as a killed process would: no `close`, no state event, no goodbye.
        The sessions stay in the dead agent object until stop() cleans them up."""
        async def kill() -> None:
            assert self.agent is not None and self._task is not None
            self.agent._stopping.set()  # no redial: this process is dead
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.stack.run(kill(), WAIT + 5)

    def stop(self) -> None:
        async def stop() -> None:
            assert self.agent is not None and self._task is not None
            await self.agent.stop()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.agent is not None:
            self.stack.run(stop(), WAIT + 5)
            self.agent = None


def offers_to(stack: EmbeddedGateway, gateway: str) -> list[str]:
    """Every action frame the router sends `gateway` from now on, as its kind (a live list)."""
    kinds: list[str] = []

    def observe(name: str, direction: str, frame: str) -> None:
        if name == gateway and direction == "out":
            kinds.append(json.loads(frame).get("kind"))
    stack.router.observe(observe)
    return kinds


async def raw_http(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are to the router; (status, headers, body) of its reply."""
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def json_error(status: int, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """The error object of a reply that must be a JSON 4xx ({"ok": false, "error": {code, message}})."""
    assert 400 <= status < 500, (status, body[:200])
    assert headers.get("content-type", "").startswith("application/json"), headers
    payload = json.loads(body)
    assert payload["ok"] is False and set(payload["error"]) == {"code", "message"}, payload
    assert "\n" not in payload["error"]["message"]
    return payload["error"]


async def echo_through(session: Session, stream_id: int, payload: bytes) -> None:
    """One tunnel connection of a live session: `payload` to the echo target and back, intact."""
    channel, reply = await session.peer.open_stream(stream_id)
    assert reply["op"] == "opened", reply
    channel.send(payload)
    received = b""
    while len(received) < len(payload):
        item = await channel.receive()
        assert isinstance(item, bytes), item
        received += item
    assert received == payload
    channel.channel.close()


class Records(logging.Handler):
    """Every log record of every logger while installed on the root logger (level DEBUG)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> Records:
        root = logging.getLogger()
        self._level = root.level
        root.addHandler(self)
        root.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        root.removeHandler(self)
        root.setLevel(self._level)

    def at(self, level: int, name: str = "") -> list[logging.LogRecord]:
        return [r for r in self.records if r.levelno == level and r.name.startswith(name)]

    def text(self) -> str:
        return "\n".join(f"{r.levelname} {r.name} {r.getMessage()} {r.exc_text or ''}" for r in self.records)
