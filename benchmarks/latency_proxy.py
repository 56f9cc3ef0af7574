"""An asyncio TCP proxy that delays every chunk by a one-way delay D, in each direction.

Put between client and router and between gateway and router, it makes one action round
trip (client -> router -> gateway -> router -> client) cost 4 D, as production's ~500 ms
per request does at D = 125 ms. Chunks keep their order; the delay is a deadline per chunk,
so throughput is not capped by D (a pipe of depth D, not a stop-and-wait). Loopback only.

    python benchmarks/latency_proxy.py --listen 127.0.0.1:9000 --target 127.0.0.1:8470 --one-way-ms 125
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import time


class LatencyProxy:
    """Listens on 127.0.0.1 and forwards to target with a one-way delay per direction."""

    def __init__(self, target_host: str, target_port: int, one_way_s: float,
                 listen_host: str = "127.0.0.1", listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.one_way_s = one_way_s
        self.listen = (listen_host, listen_port)
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> "LatencyProxy":
        self._server = await asyncio.start_server(self._handle, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(self._pipe(client_reader, target_writer),
                                 self._pipe(target_reader, client_writer))
        finally:
            for writer in (client_writer, target_writer):
                writer.close()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)  # the injected latency itself
                if not chunk:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                chunk = await reader.read(65536)
                queue.put_nowait((time.monotonic() + self.one_way_s, chunk))
                if not chunk:
                    break
            await sender
        except (ConnectionError, OSError):
            sender.cancel()
        finally:
            if not sender.done():
                sender.cancel()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--target", required=True, help="HOST:PORT")
    parser.add_argument("--one-way-ms", type=float, default=125.0)
    args = parser.parse_args()
    listen_host, listen_port = args.listen.rsplit(":", 1)
    target_host, target_port = args.target.rsplit(":", 1)

    async def run() -> None:
        proxy = await LatencyProxy(target_host, int(target_port), args.one_way_ms / 1000,
                                   listen_host, int(listen_port)).start()
        print(f"proxy 127.0.0.1:{proxy.port} -> {args.target}, {args.one_way_ms:g} ms each way", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
