"""The reference router in its own process, with its action counters readable over stdin/stdout.

`pam-gateway router` keeps router.stats in-process only; the benchmarks count signaling
actions at the router, so this runs the same Router (gateway.embedded.start_stack, no agent)
and answers each `stats` line on stdin with one JSON line:
`{"stats": {kind: n}, "conversations": {conversation_id: {kind: n}}}`.
The first stdout line is `{"url": "http://127.0.0.1:PORT"}`. Stdin EOF stops it.

    python benchmarks/router_process.py --config router.toml
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from commander_pam_plugin.gateway.config import load_config
from commander_pam_plugin.gateway.embedded import start_stack


async def serve(config_path: str) -> None:
    stack = await start_stack(load_config(config_path), with_agent=False)
    router = stack.router
    print(json.dumps({"url": router.url}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            if line.strip() == b"stats":
                answer = {"stats": dict(router.stats),
                          "conversations": {cid: dict(c) for cid, c in router.conversation_stats.items()}}
                print(json.dumps(answer), flush=True)
    finally:
        await stack.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(serve(args.config))


if __name__ == "__main__":
    main()
