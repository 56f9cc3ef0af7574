"""The data path's shortcuts (issue 12, latency): bytes that skip a task where nothing waits before
them, and the timer, socket and receive changes of sctp_tuning that go with them.

Real parts: two aiortc peer connections on 127.0.0.1, the client's ChannelPump on a real local TCP
connection, the gateway's ChannelPipe/TcpStream on a real TCP echo target. Every byte is checked."""
from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
from typing import Any

import aioice.turn
import pytest

from commander_pam_plugin import direct_stream, flow, rtc, sctp_tuning
from commander_pam_plugin.gateway.targets import ChannelPipe, TcpStream
from commander_pam_plugin.tunnel import ChannelPump, TunnelStats
from gateway_support import EchoServer


@pytest.fixture(autouse=True)
def fresh_guard():
    sctp_tuning.supported.cache_clear()
    yield
    sctp_tuning.supported.cache_clear()


@pytest.fixture(scope="module")
def echo() -> EchoServer:
    with EchoServer() as server:
        yield server


# --- DirectReader ----------------------------------------------------------------------------------

def test_the_sink_gets_bytes_only_while_nothing_is_buffered() -> None:
    """A: taken by the sink. B: refused, so buffered. C: offered nothing (B waits before it), so
    buffered behind B: the reader reads B then C, never C before B."""
    async def scenario() -> tuple[list[bytes], bytes]:
        offered: list[bytes] = []
        taken: list[bytes] = []
        accept = True
        arrived = asyncio.Event()
        connected: asyncio.Future[direct_stream.DirectReader] = asyncio.get_running_loop().create_future()

        def sink(data: bytes) -> bool:
            offered.append(data)
            arrived.set()
            if accept:
                taken.append(data)
            return accept

        async def on_connect(reader: Any, writer: asyncio.StreamWriter) -> None:
            reader.sink = sink
            connected.set_result(reader)

        server = await direct_stream.start_server(on_connect, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, client = await asyncio.open_connection("127.0.0.1", port)
        reader = await connected
        for data, take in ((b"A", True), (b"B", False)):
            accept = take
            arrived.clear()
            client.write(data)
            await asyncio.wait_for(arrived.wait(), 10)
        accept = True
        client.write(b"C")
        # readuntil leaves B in the buffer while it waits, as a pump's reader holds nothing unsent
        rest = await asyncio.wait_for(reader.readuntil(b"C"), 10)
        client.close()
        server.close()
        assert offered == [b"A", b"B"], offered  # C was never offered: B was buffered before it
        return taken, rest

    taken, rest = asyncio.run(scenario())
    assert taken == [b"A"] and rest == b"BC"


# --- a client pump and a gateway pipe over a real peer pair ------------------------------------------

async def _peer_pair() -> tuple[Any, Any, Any, Any]:
    a, b = rtc.new_peer_connection(), rtc.new_peer_connection()
    ca = a.createDataChannel("s", negotiated=True, id=4)
    cb = b.createDataChannel("s", negotiated=True, id=4)
    await rtc.set_local_description(a, await a.createOffer(), ["127.0.0.1"])
    await b.setRemoteDescription(a.localDescription)
    await rtc.set_local_description(b, await b.createAnswer(), ["127.0.0.1"])
    await a.setRemoteDescription(b.localDescription)
    opened = asyncio.Event()
    ca.on("open", opened.set)
    await asyncio.wait_for(opened.wait(), 20)
    return a, b, ca, cb


class WatchedPump(ChannelPump):
    """Records how far the local socket's unsent bytes ever ran ahead of what the pump still holds
    uncredited: written bytes must get their credit only once drained."""

    overrun = 0
    backed_up: asyncio.Event

    def _on_message(self, message: Any) -> None:
        super()._on_message(message)
        unsent = self.writer.transport.get_write_buffer_size()
        WatchedPump.overrun = max(WatchedPump.overrun, unsent - self.buffered)
        if unsent > 512 * 1024:
            WatchedPump.backed_up.set()


async def _through_a_stream(echo_port: int, rounds: int, bulk: int) -> dict[str, Any]:
    """`rounds` request/responses of random sizes, then `bulk` bytes echoed while the local
    application reads nothing until the pump's socket has backed up (or everything went out).
    Returns what arrived, how far unsent bytes ran ahead of credit, and the direct counters."""
    a, b, ca, cb = await _peer_pair()
    pipe = ChannelPipe(cb, send_limit=flow.DEFAULT_WINDOW, bound=2 * flow.DEFAULT_WINDOW)
    stream = TcpStream(pipe, "127.0.0.1", echo_port)
    await stream.connect()
    gateway = asyncio.ensure_future(stream.run())
    pumps: list[ChannelPump] = []
    pump_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def on_connect(reader: Any, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        pump = WatchedPump(ca, reader, writer, TunnelStats(), send_limit=flow.DEFAULT_WINDOW)
        pumps.append(pump)
        try:
            await pump.run()
        finally:
            pump_done.set_result(None)

    server = await direct_stream.start_server(on_connect, "127.0.0.1", 0)
    try:
        app = socket.socket()
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):  # kernel buffers small: the pump's own backs up
            app.setsockopt(socket.SOL_SOCKET, option, 32 * 1024)
        app.setblocking(False)
        await asyncio.get_running_loop().sock_connect(app, ("127.0.0.1", server.sockets[0].getsockname()[1]))
        app_reader, app_writer = await asyncio.open_connection(sock=app)
        WatchedPump.overrun = 0
        WatchedPump.backed_up = asyncio.Event()
        rng = random.Random(12)
        exchanges_intact = True
        for _ in range(rounds):
            request = os.urandom(rng.choice((1, 7, 300, 1500, 5000)))
            app_writer.write(request)
            exchanges_intact &= await asyncio.wait_for(app_reader.readexactly(len(request)), 20) == request
        payload = os.urandom(bulk)
        sent_all = asyncio.Event()

        async def send() -> None:
            for start in range(0, len(payload), 64 * 1024):
                app_writer.write(payload[start:start + 64 * 1024])
                await app_writer.drain()
            sent_all.set()
            app_writer.write_eof()

        async def receive() -> bytes:
            waits = [asyncio.ensure_future(e.wait()) for e in (sent_all, WatchedPump.backed_up)]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for wait in waits:
                wait.cancel()
            digest = hashlib.sha256()
            while chunk := await app_reader.read(256 * 1024):
                digest.update(chunk)
            return digest.digest()

        _, digest = await asyncio.wait_for(asyncio.gather(send(), receive()), 120)  # it does not hang
        await asyncio.wait_for(pump_done, 20)
        await asyncio.wait_for(gateway, 20)
        app_writer.close()
        pump = pumps[0]
        return {"exchanges": exchanges_intact, "bulk": digest == hashlib.sha256(payload).digest(),
                "overrun": WatchedPump.overrun,
                "client": (pump.direct_sends, pump.direct_writes), "gateway": pipe.direct_sends}
    finally:
        server.close()
        await a.close()
        await b.close()


@pytest.mark.parametrize("tuning", ["1", "0"], ids=["tuned", "stock"])
def test_requests_responses_and_a_bulk_transfer_are_intact_with_and_without_the_shortcuts(
        tuning: str, echo: EchoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sctp_tuning.ENV, tuning)
    result = asyncio.run(_through_a_stream(echo.port, 60, 4 * 1024 * 1024))
    assert result["exchanges"] and result["bulk"], result
    # credit for written bytes waits for drain(), which returns below the transport's low-water
    # mark: what runs ahead stays within a write buffer's worth, never the window
    assert result["overrun"] <= 128 * 1024, result
    if tuning == "1":  # the client's both ways, the gateway's from the target
        assert min(result["client"]) > 0 and result["gateway"] > 0, result
    else:  # PAM_SCTP_TUNING=0: the old task-per-hop pumps
        assert result["client"] == (0, 0) and result["gateway"] == 0, result


# --- DTLS records in the socket callback, the receive buffer -----------------------------------------

@pytest.mark.parametrize("tuning", ["1", "0"], ids=["tuned", "stock"])
def test_records_skip_the_receive_task_and_the_socket_holds_the_window_only_when_tuned(
        tuning: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sctp_tuning.ENV, tuning)

    async def scenario() -> tuple[int | None, int, int]:
        a, b, ca, cb = await _peer_pair()
        replies = asyncio.Queue()
        cb.on("message", lambda message: cb.send(message))
        ca.on("message", replies.put_nowait)
        try:
            for index in range(50):
                ca.send(b"%d" % index)
                assert await asyncio.wait_for(replies.get(), 10) == b"%d" % index
            dtls = b.sctp.transport
            pair = dtls.transport._connection._nominated[1]
            buffer = pair.protocol.transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as fresh:  # what aioice asks for
                fresh.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, aioice.turn.UDP_SOCKET_BUFFER_SIZE)
                default = fresh.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            return getattr(dtls, "pam_direct_records", None), buffer, default
        finally:
            await a.close()
            await b.close()

    direct, buffer, default = asyncio.run(scenario())
    if tuning == "1":
        assert direct is not None and direct >= 40, direct  # the echoes' records, minus a few queued
        assert buffer > default, (buffer, default)
    else:
        assert direct is None and buffer == default


# --- LazyTimer ---------------------------------------------------------------------------------------

class ManualHandle:
    def __init__(self) -> None:
        self.is_cancelled = False

    def cancel(self) -> None:
        self.is_cancelled = True

    def cancelled(self) -> bool:
        return self.is_cancelled


class ManualLoop:
    """Just what LazyTimer uses of a loop, with a clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, Any, ManualHandle]] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Any) -> ManualHandle:
        handle = ManualHandle()
        self.timers.append((self.now + delay, callback, handle))
        return handle

    def advance(self, to: float) -> None:
        while True:
            due = sorted((t for t in self.timers if t[0] <= to and not t[2].cancelled()), key=lambda t: t[0])
            if not due:
                break
            when, callback, handle = due[0]
            self.timers.remove(due[0])
            self.now = when
            callback()
        self.now = to


def test_a_moved_deadline_fires_once_at_the_new_time_and_a_cleared_one_never() -> None:
    loop = ManualLoop()
    fired: list[float] = []
    timer = sctp_tuning.LazyTimer(loop, lambda: fired.append(loop.now))  # type: ignore[arg-type]
    timer.set(1.0)
    loop.advance(0.5)
    timer.set(1.0)  # restarted: due at 1.5, with no new timer
    assert len(loop.timers) == 1 and not loop.timers[0][2].cancelled()
    loop.advance(1.4)
    assert fired == []
    loop.advance(2.0)
    assert fired == [1.5]
    timer.set(1.0)
    timer.clear()
    loop.advance(5.0)
    assert fired == [1.5] and not timer.active


def test_a_deadline_moved_earlier_than_the_armed_timer_is_not_late() -> None:
    """T3 with a shrinking RTO: started at 3 s, stopped, started again at 1 s: due at 1 s, not 3."""
    loop = ManualLoop()
    fired: list[float] = []
    timer = sctp_tuning.LazyTimer(loop, lambda: fired.append(loop.now))  # type: ignore[arg-type]
    timer.set(3.0)
    timer.clear()
    timer.set(1.0)
    loop.advance(4.0)
    assert fired == [1.0]
