"""The gateway's SSH receive window bounds what a paused reader holds (gateway/ssh_window.py):
a real asyncssh server floods a real asyncssh client that reads slowly; what the client buffers
stays within two windows with the override, and grows past that with asyncssh's own window."""
from __future__ import annotations

import asyncio
from typing import Any

import asyncssh
import pytest

from commander_pam_plugin.gateway import ssh_window
from gateway_support import demo_ssh_server

WINDOW = 256 * 1024
READS = 12


def _buffered(process: Any) -> int:
    """Bytes the client holds for stdout: the channel's paused buffer plus the stream's buffer."""
    channel = process.channel
    session = process.stdout._session
    return sum(len(data) for data, _ in channel._recv_buf) + session._recv_buf_len


async def _slow_reader_peak(port: int, username: str, password: str) -> int:
    async with asyncssh.connect("127.0.0.1", port, username=username, password=password, known_hosts=None,
                                config=None, agent_path=None, client_keys=None) as conn:
        process = await conn.create_process("head -c 104857600 /dev/zero", encoding=None, request_pty=False,
                                            window=WINDOW)
        peak = 0
        for _ in range(READS):
            # each read frees room, so the server is allowed to send again; let its data arrive
            await process.stdout.read(32 * 1024)
            for _ in range(50):
                await asyncio.sleep(0.002)
                peak = max(peak, _buffered(process))
        process.close()
        return peak


@pytest.mark.parametrize("override", [True, False], ids=["override", "stock"])
def test_a_paused_ssh_reader_holds_at_most_two_windows_only_with_the_override(override: bool) -> None:
    if override:
        assert ssh_window.apply(), "the installed asyncssh is not the one the override was checked on"
    else:
        ssh_window.restore()
    try:
        with demo_ssh_server() as ssh:
            peak = asyncio.run(_slow_reader_peak(ssh.port, ssh.username, ssh.password))
    finally:
        ssh_window.apply()
    if override:
        assert peak <= 2 * WINDOW + 32 * 1024, peak  # two windows, and at most one packet over
    else:  # asyncssh re-opens the window per packet handed on: the buffer grows with every read
        assert peak > 3 * WINDOW, peak


def test_the_override_keeps_asyncssh_s_own_method_when_its_source_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    ssh_window.restore()
    try:
        monkeypatch.setattr(ssh_window, "STOCK_SOURCE_SHA256", "0" * 64)
        assert not ssh_window.apply()
        assert asyncssh.channel.SSHChannel._deliver_data is ssh_window._stock_deliver_data
    finally:
        monkeypatch.undo()
        ssh_window.apply()


def test_pam_ssh_window_stock_keeps_asyncssh_s_own_method(monkeypatch: pytest.MonkeyPatch) -> None:
    ssh_window.restore()
    try:
        monkeypatch.setenv("PAM_SSH_WINDOW", "stock")
        assert not ssh_window.apply()
        assert asyncssh.channel.SSHChannel._deliver_data is ssh_window._stock_deliver_data
    finally:
        monkeypatch.undo()
        ssh_window.apply()
