"""TCP targets for the benchmarks, in their own process: an echo port and a bulk-transfer port.

Prints `{"echo": PORT, "bulk": PORT}` on stdout once both listen on 127.0.0.1, then serves
until stdin closes (the benchmark that started it went away) or SIGTERM.

Bulk protocol (one request per connection, the first line):
- `PUT N`: the client sends N bytes; the target answers one line, the sha256 hex of what it got.
- `PREP N SEED`: the target makes make_payload(N, SEED) ahead and answers `ok`, so
  making the bytes (~200 MB/s) is not part of a timed download.
- `GET N SEED`: the target sends those bytes (made now if not prepared), then closes; the
  client compares the sha256 with its own copy.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import sys

READ_SIZE = 1 << 20
MAX_BYTES = 1 << 34
_prepared: dict[tuple[int, int], bytes] = {}


def make_payload(size: int, seed: int) -> bytes:
    """size pseudo-random bytes from seed, the same in every process (made 16 MiB at a time)."""
    rng, piece = random.Random(seed), 16 << 20
    return b"".join(rng.randbytes(min(piece, size - start)) for start in range(0, size, piece))


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # echo the half-close too
    writer.close()


async def _bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, ValueError, asyncio.IncompleteReadError):
        words = (await reader.readline()).decode("ascii", "replace").split()
        if len(words) == 2 and words[0] == "PUT" and 0 <= int(words[1]) <= MAX_BYTES:
            left, digest = int(words[1]), hashlib.sha256()
            while left:
                data = await reader.read(min(left, READ_SIZE))
                if not data:
                    break
                digest.update(data)
                left -= len(data)
            writer.write(digest.hexdigest().encode() + b"\n")
            await writer.drain()
        elif len(words) == 3 and words[0] == "PREP" and 0 <= int(words[1]) <= MAX_BYTES:
            key = (int(words[1]), int(words[2]))
            _prepared[key] = make_payload(*key)
            writer.write(b"ok\n")
            await writer.drain()
        elif len(words) == 3 and words[0] == "GET" and 0 <= int(words[1]) <= MAX_BYTES:
            key = (int(words[1]), int(words[2]))
            payload = _prepared.pop(key, None) or make_payload(*key)
            view = memoryview(payload)
            for start in range(0, len(view), READ_SIZE):
                writer.write(view[start:start + READ_SIZE])
                await writer.drain()
    writer.close()


async def main() -> None:
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    bulk = await asyncio.start_server(_bulk, "127.0.0.1", 0)
    ports = {"echo": echo.sockets[0].getsockname()[1], "bulk": bulk.sockets[0].getsockname()[1]}
    print(json.dumps(ports), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # EOF: our parent is gone
    echo.close()
    bulk.close()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
