"""idle_consent's one-sided mode between two real aiortc peers on loopback: the ICE-controlled side
(the gateway's role) sends no consent check while the controlling side's arrive, still frees a
peer that went silent, and both sides check when the mode or the guard says so.

The intervals are scaled down (monkeypatched constants) so that a window of a second shows many
of them; the logic is the shipped one.
"""
from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiortc import RTCSessionDescription

from commander_pam_plugin import idle_consent, rtc, sctp_tuning

WINDOW_S = 1.2


@pytest.fixture(autouse=True)
def fast_intervals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sctp_tuning.ENV, "1")
    monkeypatch.setattr(idle_consent, "IDLE_CHECK_S", 0.1)
    monkeypatch.setattr(idle_consent, "PASSIVE_QUIET_S", 1.0)  # ten of the prober's intervals: load-proof
    monkeypatch.setattr(idle_consent, "CONFIRM_TICK_S", 0.02)


def _count_checks(connection: Any) -> list[int]:
    """Count the consent requests this connection builds (nominate=False: consent, not connectivity)."""
    counter = [0]
    original = connection.build_request

    def counting(pair: Any, nominate: bool) -> Any:
        if not nominate:
            counter[0] += 1
        return original(pair, nominate=nominate)

    connection.build_request = counting
    return counter


async def _pair() -> tuple[Any, Any]:
    """An offerer (ICE-controlling, the client's role) and an answerer, connected on 127.0.0.1."""
    offerer, answerer = rtc.new_peer_connection([]), rtc.new_peer_connection([])
    channel = offerer.createDataChannel("c", negotiated=True, id=0)
    answerer.createDataChannel("c", negotiated=True, id=0)
    opened = asyncio.Event()
    channel.on("open", opened.set)
    await rtc.set_local_description(offerer, await offerer.createOffer(), ["127.0.0.1"])
    await answerer.setRemoteDescription(offerer.localDescription)
    await rtc.set_local_description(answerer, await answerer.createAnswer(), ["127.0.0.1"])
    await offerer.setRemoteDescription(RTCSessionDescription(answerer.localDescription.sdp, "answer"))
    await asyncio.wait_for(opened.wait(), 10)
    return offerer, answerer


async def _checks_in_idle_window() -> tuple[int, int]:
    offerer, answerer = await _pair()
    try:
        prober, listener = rtc.ice_connection(offerer), rtc.ice_connection(answerer)
        assert prober.ice_controlling and not listener.ice_controlling
        await asyncio.sleep(0.4)  # past the listener's first look (it has heard nothing before the first check)
        sent = _count_checks(prober), _count_checks(listener)
        await asyncio.sleep(WINDOW_S)
        assert offerer.iceConnectionState == answerer.iceConnectionState == "completed"
        return sent[0][0], sent[1][0]
    finally:
        await offerer.close()
        await answerer.close()


def test_one_sided_the_controlled_side_sends_no_check_while_the_controlling_sides_arrive() -> None:
    prober, listener = asyncio.run(_checks_in_idle_window())
    assert prober >= WINDOW_S / (1.2 * idle_consent.IDLE_CHECK_S) - 2, prober
    assert listener == 0, listener


def test_mode_both_has_each_side_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(idle_consent.MODE_ENV, "both")
    prober, listener = asyncio.run(_checks_in_idle_window())
    assert min(prober, listener) >= WINDOW_S / (1.2 * idle_consent.IDLE_CHECK_S) - 2, (prober, listener)


def test_on_another_aioice_request_received_both_sides_check(monkeypatch: pytest.MonkeyPatch) -> None:
    rtc.override_supported.cache_clear()
    monkeypatch.setitem(rtc._KNOWN_SOURCES, "request_received", "0" * 64)
    try:
        prober, listener = asyncio.run(_checks_in_idle_window())
    finally:
        rtc.override_supported.cache_clear()
    assert min(prober, listener) >= WINDOW_S / (1.2 * idle_consent.IDLE_CHECK_S) - 2, (prober, listener)


async def _listener_frees_a_silent_peer() -> float:
    offerer, answerer = await _pair()
    try:
        closed = asyncio.Event()
        answerer.on("iceconnectionstatechange",
                    lambda: answerer.iceConnectionState in ("closed", "failed") and closed.set())
        prober = rtc.ice_connection(offerer)
        await asyncio.sleep(0.4)
        for protocol in prober._protocols:  # the client vanishes: no check, no answer, no data
            protocol.transport.close()
        loop = asyncio.get_running_loop()
        silent = loop.time()
        await asyncio.wait_for(closed.wait(), 10)  # a bound for "it does not hang", not a timing claim
        return loop.time() - silent
    finally:
        await offerer.close()
        await answerer.close()


def test_the_listener_frees_a_peer_whose_checks_stopped() -> None:
    assert asyncio.run(_listener_frees_a_silent_peer()) >= idle_consent.PASSIVE_QUIET_S * 0.5


async def _timers_for_waits(delays: list[float]) -> tuple[int, int]:
    """(timers the clock set, waits that ended) for consent waits of these lengths on one loop."""
    loop = asyncio.get_running_loop()
    connection = rtc.PamConnection(ice_controlling=True)
    timers = 0
    call_at, call_later = loop.call_at, loop.call_later

    def counting(original: Any) -> Any:
        def schedule(when: float, callback: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal timers
            timers += 1
            return original(when, callback, *args, **kwargs)
        return schedule

    loop.call_at, loop.call_later = counting(call_at), counting(call_later)  # type: ignore[method-assign]
    try:
        results = await asyncio.gather(*(idle_consent.wait(d, connection) for d in delays))
    finally:
        loop.call_at, loop.call_later = call_at, call_later  # type: ignore[method-assign]
    return timers, len(results)


def test_waits_ending_in_one_clock_tick_share_one_timer() -> None:
    delays = [0.3 + 0.2 * i / 50 for i in range(50)]  # 50 consent loops due within 0.2 s of each other
    timers, ended = asyncio.run(_timers_for_waits(delays))
    assert ended == 50
    assert timers <= 2, timers  # one per tick slot (0.2 s spans at most two), not one per wait


def test_with_pam_consent_clock_0_each_wait_has_its_own_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(idle_consent.CLOCK_ENV, "0")
    timers, ended = asyncio.run(_timers_for_waits([0.3 + 0.2 * i / 50 for i in range(50)]))
    assert ended == 50 and timers >= 50, timers
