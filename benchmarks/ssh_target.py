"""The `pam launch` benchmark's SSH target: a DemoSSHServer in its own process.

Prints `{"port", "username", "password"}` as one JSON line on stdout (a pipe read by the
benchmark, which writes the password only into the gateway's config file), then serves until
stdin closes or SIGTERM.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import sys

from commander_pam_plugin.gateway.demo_ssh import DemoSSHServer


async def main() -> None:
    server = await DemoSSHServer().start()
    print(json.dumps({"port": server.port, "username": server.username, "password": server.password}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # EOF: our parent is gone
    server.close()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
