"""TCP streams whose arriving bytes can skip the reader task: one loop iteration less per message.

With asyncio's streams, bytes that arrive on a socket go into the StreamReader's buffer in the
protocol callback and a task waiting in `read()` picks them up on a later loop iteration, only to
pass them on at once (to a data channel). A `DirectReader` first offers the bytes to its `sink`
while nothing is buffered: a sink that can pass them on now (credit and buffer room allow) takes
them there and then; otherwise they are buffered as usual and the reader task, with its flow
control, carries on. Bytes are never reordered: the sink sees data only when the buffer is empty,
and the owner must refuse in its sink while it holds bytes it has read but not yet sent.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

LIMIT = 64 * 1024  # asyncio's default StreamReader limit: reading pauses at twice this much buffered

Sink = Callable[[bytes], bool]


class DirectReader(asyncio.StreamReader):
    """A StreamReader whose `sink` may take arriving bytes before they are buffered."""

    sink: Sink | None = None

    def feed_data(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None and data and not self._buffer and not self._eof and sink(data):  # type: ignore[attr-defined]
            return
        super().feed_data(data)


async def start_server(connected: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
                       host: str, port: int) -> asyncio.AbstractServer:
    """asyncio.start_server with DirectReader readers."""
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.StreamReaderProtocol:
        return asyncio.StreamReaderProtocol(DirectReader(limit=LIMIT, loop=loop), connected, loop=loop)
    return await loop.create_server(factory, host, port)


async def open_connection(host: str, port: int) -> tuple[DirectReader, asyncio.StreamWriter]:
    """asyncio.open_connection with a DirectReader."""
    loop = asyncio.get_running_loop()
    reader = DirectReader(limit=LIMIT, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.create_connection(lambda: protocol, host, port)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


def write_now(writer: asyncio.StreamWriter, data: bytes) -> int | None:
    """Write without waiting: None when the transport is closing (the caller queues instead),
    else the bytes still in the transport's buffer (0: the kernel took everything; never 0 when
    the write lost the connection, so the caller's drain() raises the error as stock's would)."""
    transport = writer.transport
    if transport.is_closing():
        return None
    try:
        writer.write(data)
    except (ConnectionError, OSError, RuntimeError):
        return None
    if transport.is_closing():  # the write failed (reset, broken pipe): drain() must report it, as stock
        return max(1, transport.get_write_buffer_size())
    return transport.get_write_buffer_size()
