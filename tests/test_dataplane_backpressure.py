"""Back-pressure end to end: the real plugin runtime, a real gateway process, real TCP on 127.0.0.1.

A sender offers 200 MiB; the reader at the other end takes 64 KiB/s (or nothing). For a
bounded time we watch the gateway process's RSS, the bytes the client's pumps hold and how
much the sender got rid of: with flow control the sender blocks and nothing grows, and a
second stream of the same tunnel keeps moving sha256-checked data meanwhile.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pytest

from client_support import echo_roundtrip, payload, sha256
from commander_pam_plugin.config import PamConfig
from commander_pam_plugin.flow import DEFAULT_WINDOW
from commander_pam_plugin.peer import HIGH_WATER
from commander_pam_plugin.runtime import PamRuntime
from commander_pam_plugin.tunnel import Tunnel
from dataplane_support import LimitedGateway, ModeTarget, Sender, SlowReader, rss_bytes
from gateway_support import make_config

MEASURE_S = 12.0  # bounded observation window, not a timing claim
MIB = 1024 * 1024
# Bounds the tests state. Kernel socket buffers on loopback (up to ~6 MiB receive, 4 MiB send)
# sit between the sender and the pumps; the product itself holds at most one window per stream.
GATEWAY_GROWTH_BOUND = 8 * MIB
CLIENT_GROWTH_BOUND = 8 * MIB
SENDER_SLACK = 16 * MIB
# Two streams at once (the blocked one and the echo): each a window received plus at most the
# 1 MiB high-water mark and one read queued on its channel.
TOTAL_HELD_BOUND = 2 * (DEFAULT_WINDOW + HIGH_WATER + 64 * 1024)  # what the sender may get rid of beyond what the reader took


@dataclass
class Stack:
    target: ModeTarget
    gateway: LimitedGateway
    runtime: PamRuntime
    tunnel: Tunnel

    @property
    def port(self) -> int:
        return self.tunnel.port

    def held_by_client(self) -> tuple[int, int]:
        """(most one stream holds received and unwritten, all that the pumps hold incl. unsent)."""
        pumps = list(self.tunnel._pumps.values())
        return (max((p.buffered for p in pumps), default=0),
                sum(p.buffered + p.channel.bufferedAmount for p in pumps))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    target = ModeTarget()
    config = make_config([{"name": "mode", "kind": "tcp", "host": "127.0.0.1", "port": target.port}])
    gateway = LimitedGateway(config, tmp_path_factory.mktemp("gateway"))
    runtime = PamRuntime(PamConfig(router_url=gateway.router_url, token=gateway.user_token("alice"),
                                   host_addresses=("127.0.0.1",)))
    try:
        tunnel = runtime.start_tunnel(None, runtime.resolve(None, "mode"), "127.0.0.1", 0, trickle=True)
        stack = Stack(target, gateway, runtime, tunnel)
        _check_echo(stack, 2 * MIB, seed=0)  # warm both processes up before any baseline
        yield stack
    finally:
        runtime.shutdown()
        gateway.stop()
        target.close()


def _check_echo(stack: Stack, size: int, seed: int) -> None:
    blob = payload(size, seed)
    assert sha256(echo_roundtrip(stack.port, b"E" + blob)) == sha256(blob)


@dataclass
class Watch:
    gateway_peak: int = 0
    client_peak: int = 0
    held_peak: int = 0  # one stream, received and not yet written to the local application
    total_held_peak: int = 0  # every stream, including bytes queued on the channels
    samples: list[tuple[float, int, int]] = field(default_factory=list)


def _observe(stack: Stack, during: Callable[[], None]) -> Watch:
    """Sample memory for MEASURE_S while `during` runs once (another stream's echo) in between."""
    gateway_base, client_base = stack.gateway.rss(), rss_bytes()
    watch = Watch()
    start = time.monotonic()
    ran = False
    while time.monotonic() - start < MEASURE_S:
        if not ran and time.monotonic() - start > MEASURE_S / 3:
            during()
            ran = True
        gateway, client = stack.gateway.rss() - gateway_base, rss_bytes() - client_base
        watch.gateway_peak = max(watch.gateway_peak, gateway)
        watch.client_peak = max(watch.client_peak, client)
        held, total = stack.held_by_client()
        watch.held_peak = max(watch.held_peak, held)
        watch.total_held_peak = max(watch.total_held_peak, total)
        watch.samples.append((round(time.monotonic() - start, 1), gateway, client))
        time.sleep(0.25)  # sampling cadence of a measurement, nothing waits on it
    assert ran
    return watch


def _report(name: str, watch: Watch, **extra: Any) -> None:
    print(f"\n{name}: gateway RSS growth peak {watch.gateway_peak / MIB:.1f} MiB, client RSS growth peak "
          f"{watch.client_peak / MIB:.1f} MiB, client held peak {watch.held_peak / MIB:.2f} MiB per stream, "
          f"{watch.total_held_peak / MIB:.2f} MiB in all, "
          + ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in extra.items()))


def test_a_slow_target_slows_the_client_sender_and_another_stream_keeps_moving(stack: Stack) -> None:
    read_before = stack.target.slow_read
    sender = Sender(stack.port, b"S")
    try:
        watch = _observe(stack, lambda: _check_echo(stack, 4 * MIB, seed=1))
        read = stack.target.slow_read - read_before
        _report("upload to a 64 KiB/s target", watch, offered=200 * MIB, sent=sender.sent, read=read)
        assert read > 0, "the slow target received nothing"
        assert sender.error is None, f"the stream was cut: {sender.error!r}"
        assert sender.sent < read + SENDER_SLACK, "the sender was not blocked"
        assert watch.gateway_peak < GATEWAY_GROWTH_BOUND
        assert watch.total_held_peak <= TOTAL_HELD_BOUND
    finally:
        sender.close()


def test_a_slow_local_reader_slows_the_target_and_another_stream_keeps_moving(stack: Stack) -> None:
    sent_before = stack.target.download_sent
    reader = SlowReader(stack.port, b"D")
    try:
        watch = _observe(stack, lambda: _check_echo(stack, 4 * MIB, seed=2))
        sent = stack.target.download_sent - sent_before
        _report("download into a 64 KiB/s local reader", watch, offered=200 * MIB, sent=sent, read=reader.read)
        assert reader.read > 0
        assert sent < reader.read + SENDER_SLACK, "the target's sends were not held back"
        assert watch.held_peak <= DEFAULT_WINDOW
        assert watch.total_held_peak <= TOTAL_HELD_BOUND
        assert watch.client_peak < CLIENT_GROWTH_BOUND
        assert watch.gateway_peak < GATEWAY_GROWTH_BOUND
    finally:
        reader.close()


def test_a_silent_target_keeps_the_gateway_bounded_and_the_sender_blocked(stack: Stack) -> None:
    sender = Sender(stack.port, b"Q")
    try:
        watch = _observe(stack, lambda: _check_echo(stack, 4 * MIB, seed=3))
        _report("upload to a silent target", watch, offered=200 * MIB, sent=sender.sent)
        assert sender.error is None, f"the stream was cut: {sender.error!r}"
        assert sender.sent < SENDER_SLACK, "the sender was not blocked"
        assert watch.gateway_peak < GATEWAY_GROWTH_BOUND
    finally:
        sender.close()
    _check_echo(stack, 1 * MIB, seed=4)  # the tunnel is still fine afterwards
