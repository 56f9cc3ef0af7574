"""The demo SSH server when the client's connection drops mid-session: the command is ended, and
asyncssh's pipe cleanup still runs (no "coroutine 'Event.wait' was never awaited")."""
from __future__ import annotations

import asyncio
import gc
import os
import warnings

import asyncssh
import pytest

from commander_pam_plugin.gateway.demo_ssh import DemoSSHServer

WAIT_S = 20.0  # a "does not hang" bound, not a timing claim


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def _drop_mid_session(server: DemoSSHServer, pty: bool) -> int:
    conn = await asyncssh.connect("127.0.0.1", server.port, username=server.username, password=server.password,
                                  known_hosts=None)
    process = await conn.create_process("echo $$; exec cat", term_type="xterm" if pty else None)
    pid = int((await asyncio.wait_for(process.stdout.readline(), WAIT_S)).strip())
    process.stdin.write("still here\n")
    assert (await asyncio.wait_for(process.stdout.readline(), WAIT_S)).strip() == "still here"
    conn.abort()  # the connection drops; `cat` would wait for input forever
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while _alive(pid):
        assert loop.time() < deadline, f"the session's command (pid {pid}) outlived its connection"
        await asyncio.sleep(0.05)
    return pid


@pytest.mark.parametrize("pty", [False, True], ids=["pipes", "pty"])
def test_a_dropped_connection_ends_the_command_and_leaves_no_unawaited_cleanup(pty: bool) -> None:
    async def main() -> None:
        server = await DemoSSHServer().start()
        try:
            for _ in range(2):
                await _drop_mid_session(server, pty)
            await asyncio.wait_for(server.sessions_done(), WAIT_S)  # their cleanup included
        finally:
            server.close()

    # What earlier tests left is theirs: collect it first, and let no automatic collection run
    # while recording, so the final collect finds only this test's garbage.
    gc.collect()
    gc.disable()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            asyncio.run(asyncio.wait_for(main(), 60))
            gc.collect()
    finally:
        gc.enable()
    unawaited = [str(w.message) for w in caught if "never awaited" in str(w.message)]
    assert not unawaited, unawaited

