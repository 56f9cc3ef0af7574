"""rtc.py: explicit ICE servers, the host-address policy, and the guarded aioice overrides."""
from __future__ import annotations

import asyncio

import aioice.stun
import aiortc.rtcicetransport
import pytest
from aiortc import RTCSessionDescription

from commander_pam_plugin import protocol, rtc


async def _connect_pair(offer_addresses: list[str], answer_addresses: list[str]) -> tuple[str, str]:
    """Two real peers on loopback: returns (offer SDP, answer SDP) once a negotiated channel is open."""
    offerer, answerer = rtc.new_peer_connection([]), rtc.new_peer_connection([])
    channel = offerer.createDataChannel("c", negotiated=True, id=0)
    answerer.createDataChannel("c", negotiated=True, id=0)
    opened = asyncio.Event()
    channel.on("open", opened.set)
    try:
        await rtc.set_local_description(offerer, await offerer.createOffer(), offer_addresses)
        await answerer.setRemoteDescription(offerer.localDescription)
        await rtc.set_local_description(answerer, await answerer.createAnswer(), answer_addresses)
        await offerer.setRemoteDescription(RTCSessionDescription(answerer.localDescription.sdp, "answer"))
        await asyncio.wait_for(opened.wait(), 10)
        return offerer.localDescription.sdp, answerer.localDescription.sdp
    finally:
        await offerer.close()
        await answerer.close()


def test_only_the_configured_addresses_become_candidates_and_no_stun_is_added() -> None:
    offer, answer = asyncio.run(_connect_pair(["127.0.0.2", "127.0.0.3"], ["127.0.0.1"]))
    _, offered, end = protocol.split_sdp_candidates(offer)
    assert sorted(c["candidate"].split()[4] for c in offered) == ["127.0.0.2", "127.0.0.3"]
    assert all(" typ host" in c["candidate"] for c in offered) and end  # no srflx: no STUN server
    _, answered, _ = protocol.split_sdp_candidates(answer)
    assert [c["candidate"].split()[4] for c in answered] == ["127.0.0.1"]


def test_the_override_is_installed_and_falls_back_to_stock_aioice_when_the_source_differs(
        mocker) -> None:
    rtc.install()
    assert aiortc.rtcicetransport.Connection is rtc.PamConnection
    assert rtc.override_supported("connect") and rtc.override_supported("query_consent")
    rtc.override_supported.cache_clear()
    mocker.patch.dict(rtc._KNOWN_SOURCES, {"connect": "0" * 64, "query_consent": "0" * 64})
    try:
        assert not rtc.override_supported("connect")
        asyncio.run(_connect_pair(["127.0.0.1"], ["127.0.0.1"]))  # stock behaviour still connects
    finally:
        rtc.override_supported.cache_clear()


def test_wildcards_and_garbage_are_not_host_addresses() -> None:
    assert rtc.check_host_addresses([" 127.0.0.1", "127.0.0.1", "::1"]) == ("127.0.0.1", "::1")
    for bad in (["0.0.0.0"], ["::"], ["example.org"], []):
        with pytest.raises(ValueError):
            rtc.check_host_addresses(bad)


class _Pair:
    remote_addr = ("127.0.0.1", 9)

    def __init__(self) -> None:
        self.protocol = self

    async def request(self, *args, **kwargs) -> None:
        raise aioice.stun.TransactionError()  # every consent check goes unanswered


async def _consent_outcome(recent_traffic: bool, checks: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run the consent loop against a peer that never answers; return after how many checks it gave up
    (or `checks` + 1 if it did not)."""
    monkeypatch.setattr(rtc, "CONSENT_INTERVAL_S", 0.001)
    connection = rtc.PamConnection(ice_controlling=True)
    connection.remote_password = "pw"
    connection._nominated = {1: _Pair()}
    connection.build_request = lambda pair, nominate: object()
    done = 0
    closed = asyncio.Event()

    async def close() -> None:
        closed.set()

    connection.close = close
    original_sleep = asyncio.sleep

    async def counting_sleep(delay: float) -> None:
        nonlocal done
        done += 1
        if recent_traffic:
            connection.data_received(b"dtls", 1)  # the peer keeps sending data between checks
        await original_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", counting_sleep)
    task = asyncio.ensure_future(connection.query_consent())
    while not closed.is_set() and done <= checks:
        await original_sleep(0)
    task.cancel()
    return done if closed.is_set() else checks + 1


def test_consent_gives_up_on_a_silent_peer_after_three_missed_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    assert asyncio.run(_consent_outcome(False, 20, monkeypatch)) == rtc.CONSENT_FAILURES


def test_consent_keeps_a_busy_peer_whose_answers_are_late(monkeypatch: pytest.MonkeyPatch) -> None:
    assert asyncio.run(_consent_outcome(True, 20, monkeypatch)) == 21
