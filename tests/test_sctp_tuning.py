"""The SCTP/DTLS overrides: built only for the aiortc they were written against, switched off by
PAM_SCTP_TUNING=0, and every byte intact either way, also when datagrams are lost."""
from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import time
import sys
from pathlib import Path

import pytest
from aiortc import RTCDtlsTransport, RTCSctpTransport

from commander_pam_plugin import idle_consent, rtc, sctp_tuning
from commander_pam_plugin.gateway.embedded import EmbeddedGateway
from gateway_support import EchoServer, make_config

HERE = Path(__file__).parent
SHELL = [sys.executable, "-m", "commander_pam_plugin.shell"]
ECHO_CHECK = f"{sys.executable} {HERE / 'tools' / 'echo_check.py'}"


@pytest.fixture(autouse=True)
def fresh_guard():
    sctp_tuning.supported.cache_clear()
    yield
    sctp_tuning.supported.cache_clear()


def _transport_types() -> tuple[type, type]:
    """What a new peer connection builds for its data channels (no network needed)."""
    async def build() -> tuple[type, type]:
        pc = rtc.new_peer_connection()
        pc.createDataChannel("probe")
        types = (type(pc.sctp), type(pc.sctp.transport))
        await pc.close()
        return types
    return asyncio.run(build())


def test_the_tuned_transports_are_built_for_the_known_aiortc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sctp_tuning.ENV, raising=False)
    assert sctp_tuning.supported("sctp") and sctp_tuning.supported("dtls")
    assert _transport_types() == (sctp_tuning.TunedSctpTransport, sctp_tuning.TunedDtlsTransport)


@pytest.mark.parametrize("part", ["sctp", "dtls"])
def test_a_changed_aiortc_method_gives_the_stock_transport(part: str, mocker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sctp_tuning.ENV, raising=False)
    sources = sctp_tuning._KNOWN_SOURCES[part]
    mocker.patch.dict(sources, {next(iter(sources)): "0" * 64})  # as if aiortc had changed that method
    sctp_type, dtls_type = _transport_types()
    if part == "sctp":
        assert sctp_type is RTCSctpTransport and dtls_type is sctp_tuning.TunedDtlsTransport
    else:
        assert dtls_type is RTCDtlsTransport and sctp_type is sctp_tuning.TunedSctpTransport


def test_pam_sctp_tuning_0_gives_the_stock_transports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sctp_tuning.ENV, "0")
    assert _transport_types() == (RTCSctpTransport, RTCDtlsTransport)


async def _pair_transfer(size: int, drop_every: int, both_ways: bool = True) -> tuple[bool, bool, int, int]:
    """Two real peer connections on 127.0.0.1 send `size` random bytes a->b (and b->a at once) while
    every `drop_every`-th DTLS datagram received is dropped (0: none). Returns (a->b intact, b->a
    intact, DATA chunks b received in order, SACKs b sent on its own while nothing was missing)."""
    a, b = rtc.new_peer_connection(), rtc.new_peer_connection()
    ca = a.createDataChannel("x", negotiated=True, id=2)
    cb = b.createDataChannel("x", negotiated=True, id=2)
    await rtc.set_local_description(a, await a.createOffer(), ["127.0.0.1"])
    await b.setRemoteDescription(a.localDescription)
    await rtc.set_local_description(b, await b.createAnswer(), ["127.0.0.1"])
    await a.setRemoteDescription(b.localDescription)
    opened = asyncio.Event()
    ca.on("open", opened.set)
    await asyncio.wait_for(opened.wait(), 20)

    received = {"a": 0, "b": 0}
    data_chunks = 0
    original = rtc.PamConnection.data_received
    count_chunk = b.sctp._receive_data_chunk

    in_order = {"chunks": 0, "sacks": 0}  # while nothing is missing: the delayed-SACK regime
    send_sack = b.sctp._send_sack

    async def counted(chunk) -> None:
        nonlocal data_chunks
        data_chunks += 1
        if not b.sctp._sack_misordered and chunk.tsn == (b.sctp._last_received_tsn + 1) % 2**32:
            in_order["chunks"] += 1
        await count_chunk(chunk)

    async def counted_sack() -> None:
        if not b.sctp._sack_misordered and not b.sctp._sack_duplicates:
            in_order["sacks"] += 1
        await send_sack()

    b.sctp._receive_data_chunk = counted
    b.sctp._send_sack = counted_sack

    def lossy(self, data: bytes, component: int) -> None:
        received["b" if self is b_ice else "a"] += 1
        if drop_every and (received["a"] + received["b"]) % drop_every == 0:
            return
        original(self, data, component)

    b_ice = b.sctp.transport.transport._connection
    rtc.PamConnection.data_received = lossy  # type: ignore[method-assign]
    try:
        payloads = {"a": os.urandom(size), "b": os.urandom(size if both_ways else 1)}
        digests = {"a": hashlib.sha256(), "b": hashlib.sha256()}
        counts = {"a": 0, "b": 0}
        done = {"a": asyncio.Event(), "b": asyncio.Event()}

        def receiver(name: str):
            def on_message(message: bytes) -> None:
                digests[name].update(message)
                counts[name] += len(message)
                if counts[name] >= len(payloads["b" if name == "a" else "a"]):
                    done[name].set()
            return on_message

        cb.on("message", receiver("b"))
        ca.on("message", receiver("a"))

        async def send(channel, payload: bytes) -> None:
            low = asyncio.Event()
            channel.bufferedAmountLowThreshold = 256 * 1024
            channel.on("bufferedamountlow", low.set)
            for start in range(0, len(payload), 16384):
                channel.send(payload[start:start + 16384])
                if channel.bufferedAmount > 1024 * 1024:
                    low.clear()
                    await low.wait()

        await asyncio.gather(send(ca, payloads["a"]), send(cb, payloads["b"]))
        await asyncio.wait_for(asyncio.gather(done["a"].wait(), done["b"].wait()), 240)  # it does not hang
        sacks = in_order["sacks"]
        data_chunks = in_order["chunks"]
        return (digests["b"].digest() == hashlib.sha256(payloads["a"]).digest(),
                digests["a"].digest() == hashlib.sha256(payloads["b"]).digest(), data_chunks, sacks)
    finally:
        rtc.PamConnection.data_received = original  # type: ignore[method-assign]
        await a.close()
        await b.close()


@pytest.mark.parametrize("tuning", ["1", "0"], ids=["tuned", "stock"])
@pytest.mark.parametrize("drop_every", [0, 41], ids=["no-drops", "1-in-41-dropped"])
def test_every_byte_arrives_both_ways_also_when_datagrams_are_lost(tuning: str, drop_every: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sctp_tuning.ENV, tuning)
    a_to_b, b_to_a, _, _ = asyncio.run(_pair_transfer(2 * 1024 * 1024, drop_every))
    assert a_to_b and b_to_a


def test_the_receiver_acknowledges_at_most_every_second_packet(monkeypatch: pytest.MonkeyPatch) -> None:
    """One way a->b, no drops: while nothing is missing, b's SACKs (RFC 9260 6.2 allows one per two
    packets) are about half of the DATA chunks it got in order (one per packet here: a full chunk
    fills aiortc's packet). The loop's own socket buffer may still overflow: gaps get at-once SACKs."""
    monkeypatch.setenv(sctp_tuning.ENV, "1")
    a_to_b, _, data_chunks, sacks = asyncio.run(_pair_transfer(2 * 1024 * 1024, 0, both_ways=False))
    assert a_to_b
    assert data_chunks > 1000 and 0 < sacks <= data_chunks // 2 + 20, (sacks, data_chunks)


@pytest.fixture(scope="module")
def echo() -> EchoServer:
    with EchoServer() as server:
        yield server


@pytest.mark.parametrize("tuning", ["1", "0"], ids=["tuned", "stock"])
def test_32_mib_each_way_through_a_real_tunnel(tuning: str, echo: EchoServer, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The shell's tunnel and the gateway both built with the same setting; sha256 checked by echo_check."""
    monkeypatch.setenv(sctp_tuning.ENV, tuning)  # the embedded gateway's peers are built in this process
    config = tmp_path / "client.toml"
    config.write_text("")
    with EmbeddedGateway(make_config([{"name": "echo", "kind": "tcp", "host": "127.0.0.1",
                                       "port": echo.port}])) as gateway:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAM_")}
        env.update(PAM_ROUTER_URL=gateway.router_url, PAM_TOKEN=gateway.user_token("alice"),
                   PAM_CONFIG=str(config), PAM_SCTP_TUNING=tuning)
        result = subprocess.run([*SHELL, "pam", "tunnel", "start", "echo", "--run", f"{ECHO_CHECK} {{port}} 32"],
                                env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "received 33554432 sha256 match" in result.stdout


def _consent_connection(tuning: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(sctp_tuning.ENV, tuning)
    connection = rtc.PamConnection(ice_controlling=True)
    connection._pam_last_check = time.monotonic()  # a check was just answered
    connection._pam_last_answer = time.monotonic()
    return connection


def test_an_idle_session_checks_consent_every_two_seconds_not_every_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    connection = _consent_connection("1", monkeypatch)
    assert not idle_consent.check_due(connection, 0)
    assert idle_consent.tick_s(rtc.CONSENT_INTERVAL_S, 0, connection) >= 0.8 * idle_consent.IDLE_CHECK_S - 0.01
    connection._pam_last_check -= idle_consent.IDLE_CHECK_S
    assert idle_consent.check_due(connection, 0)


def test_a_missed_check_or_unanswered_traffic_makes_the_next_check_due_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    connection = _consent_connection("1", monkeypatch)
    assert idle_consent.check_due(connection, 1)  # confirming a miss
    assert idle_consent.tick_s(rtc.CONSENT_INTERVAL_S, 1, connection) <= 1.2 * idle_consent.CONFIRM_TICK_S
    connection = _consent_connection("1", monkeypatch)
    connection._pam_last_answer -= idle_consent.SUSPECT_AFTER_S  # heard nothing since we sent
    connection._pam_last_sent = time.monotonic()
    assert idle_consent.check_due(connection, 0)


def test_with_pam_sctp_tuning_0_every_tick_checks_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    connection = _consent_connection("0", monkeypatch)
    assert idle_consent.check_due(connection, 0)
    assert idle_consent.tick_s(rtc.CONSENT_INTERVAL_S, 0, connection) <= 1.2 * rtc.CONSENT_INTERVAL_S
