"""Tunnel data plane: flow control, large transfers, many streams at once."""
from __future__ import annotations

import asyncio
import hashlib

import pytest
from gateway_support import EchoServer, RouterClient, connect, make_config, run
from pyee.asyncio import AsyncIOEventEmitter

from commander_pam_plugin.gateway.embedded import EmbeddedGateway
from commander_pam_plugin.gateway.targets import CHUNK, FLOW_HIGH, FLOW_LOW, ChannelPipe


class _BufferingChannel(AsyncIOEventEmitter):
    """Just enough of RTCDataChannel to watch ChannelPipe's one decision: when to stop sending."""

    id = 2
    readyState = "open"

    def __init__(self) -> None:
        super().__init__()
        self.bufferedAmount = 0
        self.bufferedAmountLowThreshold = 0
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)
        self.bufferedAmount += len(data)


def test_sending_pauses_over_the_high_mark_until_bufferedamountlow():
    async def main():
        channel = _BufferingChannel()
        pipe = ChannelPipe(channel)
        assert channel.bufferedAmountLowThreshold == FLOW_LOW
        await pipe.send(b"a" * (FLOW_HIGH // 2))  # under the mark: returns at once
        blocked = asyncio.ensure_future(pipe.send(b"b" * FLOW_HIGH))
        await asyncio.sleep(0)  # let it run up to its wait
        assert not blocked.done()
        assert max(len(m) for m in channel.sent) == CHUNK
        channel.bufferedAmount = FLOW_LOW
        channel.emit("bufferedamountlow")
        await asyncio.wait_for(blocked, 5)
    run(main())


@pytest.fixture(scope="module")
def gateway():
    with EchoServer() as echo:
        resources = [{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}]
        with EmbeddedGateway(make_config(resources)) as gw:
            yield gw, echo


async def _transfer(session, stream_id: int, payload: bytes) -> None:
    channel, reply = await session.peer.open_stream(stream_id)
    assert reply["op"] == "opened"
    for start in range(0, len(payload), 64 * 1024):
        channel.send(payload[start:start + 64 * 1024])
    channel.send_control("eof")
    data, end = await channel.read_until("eof", timeout=30)
    assert end == {"op": "eof"}
    assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()


def test_a_large_transfer_arrives_intact(gateway):
    gw, _ = gateway

    async def main():
        async with RouterClient(gw.router_url, gw.user_token("alice")) as c:
            session = await connect(c, gw.gateway_name, "echo")
            await _transfer(session, 2, bytes(range(251)) * (6 * 1024 * 1024 // 251))
            await session.close(c, gw.gateway_name)
    run(main())


def test_many_streams_share_one_tunnel(gateway):
    gw, echo = gateway

    async def main():
        async with RouterClient(gw.router_url, gw.user_token("bob")) as c:
            session = await connect(c, gw.gateway_name, "echo")
            before = echo.connections
            await asyncio.gather(*(_transfer(session, 2 + i, bytes([i]) * (32 * 1024 + i)) for i in range(24)))
            assert echo.connections - before == 24
            await session.close(c, gw.gateway_name)
    run(main())
