"""Back-pressure on the terminal channel: the gateway sends only within the client's credit, and
`pam launch` into a slow reader keeps both processes bounded. Real SSH server, router,
gateway, aiortc peers; the client is the real shell in its own process.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from commander_pam_plugin.gateway.embedded import EmbeddedGateway
from commander_pam_plugin.flow import credit_message
from dataplane_support import SLOW_RATE, LimitedGateway, rss_bytes
from gateway_support import RouterClient, connect, demo_ssh_server, make_config, run, ssh_resource

MIB = 1024 * 1024
FLOOD = "head -c 209715200 /dev/zero"  # 200 MiB of output
WINDOW = 256 * 1024


async def _read_at_least(reader, size: int) -> int:
    got = 0
    while got < size:
        item = await reader.receive(timeout=30)
        assert isinstance(item, (bytes, dict)), item
        if isinstance(item, bytes):
            got += len(item)
    return got


async def _quiet_for(reader, seconds: float) -> int:
    """Bytes that arrive within `seconds` (a bound on what should be zero, not a timing claim)."""
    got = 0
    try:
        while True:
            item = await reader.receive(timeout=seconds)
            if isinstance(item, bytes):
                got += len(item)
    except asyncio.TimeoutError:
        return got


def test_the_gateway_sends_terminal_output_only_within_the_clients_credit() -> None:
    with demo_ssh_server() as ssh, EmbeddedGateway(make_config([ssh_resource(ssh)])) as gw:
        async def main() -> tuple[int, int, int]:
            async with RouterClient(gw.router_url, gw.user_token("alice")) as c:
                session = await connect(c, gw.gateway_name, "ssh", session={
                    "mode": "terminal", "term": "xterm", "cols": 80, "rows": 24, "command": FLOOD,
                    "pty": False, "window": WINDOW})
                terminal = session.peer.terminal
                first = await _read_at_least(terminal, WINDOW)
                first += await _quiet_for(terminal, 1.0)
                terminal.send(credit_message(2 * WINDOW))
                second = first + await _read_at_least(terminal, WINDOW)
                second += await _quiet_for(terminal, 1.0)
                # an older client that grants nothing after its window is simply held there
                await session.close(c, gw.gateway_name)
                return first, second, WINDOW
        first, second, window = run(main())
    assert first == window and second == 2 * window, (first, second)


def test_pam_launch_into_a_slow_reader_keeps_client_and_gateway_bounded(tmp_path: Path) -> None:
    with demo_ssh_server() as ssh:
        gateway = LimitedGateway(make_config([ssh_resource(ssh)]), tmp_path)
        config = tmp_path / "client.toml"
        config.write_text("")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAM_")}
        env.update(HOME=str(tmp_path), PAM_ROUTER_URL=gateway.router_url, PAM_TOKEN=gateway.user_token("alice"),
                   PAM_CONFIG=str(config))
        client = subprocess.Popen([sys.executable, "-m", "commander_pam_plugin.shell", "pam", "launch", "ssh",
                                   "--command", FLOOD], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, env=env)
        try:
            assert client.stdout is not None
            fd = client.stdout.fileno()
            read = len(os.read(fd, 16384))  # first output: both processes are warm
            client_base, gateway_base = rss_bytes(client.pid), gateway.rss()
            client_peak = gateway_peak = 0
            start = time.monotonic()
            while time.monotonic() - start < 12.0:
                delay = start + read / SLOW_RATE - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # the slow reader's pacing: the behaviour under test
                read += len(os.read(fd, 16384))
                client_peak = max(client_peak, rss_bytes(client.pid) - client_base)
                gateway_peak = max(gateway_peak, gateway.rss() - gateway_base)
            assert client.poll() is None, "pam launch ended early"
        finally:
            client.kill()
            client.wait(10)
            gateway.stop()
    print(f"\npam launch into a 64 KiB/s reader: read {read / MIB:.1f} MiB of 200 MiB offered in 12 s; "
          f"client RSS growth peak {client_peak / MIB:.1f} MiB, gateway {gateway_peak / MIB:.1f} MiB")
    # 200 MiB offered: unbounded buffering would grow by tens of MiB here. The gateway keeps one SSH
    # window (1 MiB), what asyncssh's stream buffers before it pauses the channel (1 MiB) and the
    # output the client has not acknowledged (PROTOCOL.md section 7): 2.2 MiB measured quiet. With
    # asyncssh's own window (PAM_SSH_WINDOW=stock, gateway/ssh_window.py) it grew 12-21 MiB; with
    # the read not waiting for the client (the back-pressure this guards) 227 MiB.
    assert client_peak < 8 * MIB and gateway_peak < 8 * MIB
