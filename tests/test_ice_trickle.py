"""Trickle that never waits on a slow ICE server: host candidates at once, srflx/relay ones later.

Real aiortc peers, real UDP STUN servers on 127.0.0.1 (tests/netlab/loopback.py), the real
router and gateway. Bounds here only say "it did not hang" (a dead server used to cost 5 s
per gathering); the 1.1x claim is measured by benchmarks/netlab_connect.py.
"""
from __future__ import annotations

import asyncio
import time

import pytest
from aiortc import RTCSessionDescription

from commander_pam_plugin import protocol, rtc
from commander_pam_plugin.gateway.embedded import EmbeddedGateway
from commander_pam_plugin.loop import BackgroundLoop
from commander_pam_plugin.negotiation import ConnectOptions, RouterClient, open_session
from gateway_support import EchoServer, make_config
from netlab.loopback import StunServer

NO_HANG_S = rtc.LATE_GATHER_TIMEOUT_S * 0.8  # a stalled gathering takes LATE_GATHER_TIMEOUT_S


async def _pair(stun_url: str) -> dict:
    """Offerer and answerer both configured with `stun_url`; what each step saw."""
    servers = rtc.ice_servers_from_config([stun_url])
    offerer, answerer = rtc.new_peer_connection(servers), rtc.new_peer_connection(servers)
    channel = offerer.createDataChannel("c", negotiated=True, id=0)
    answerer.createDataChannel("c", negotiated=True, id=0)
    opened = asyncio.Event()
    channel.on("open", opened.set)
    late: list = []
    ended = asyncio.Event()
    seen: dict = {}
    try:
        started = time.monotonic()
        await rtc.set_local_description(offerer, await offerer.createOffer(), ["127.0.0.1"])
        seen["offer_s"] = time.monotonic() - started
        seen["offer_sdp"] = rtc.local_description_sdp(offerer)
        seen["late_pending"] = rtc.gathering_late(offerer)
        rtc.watch_late_candidates(offerer, lambda c: late.append(c) if c else ended.set())
        await answerer.setRemoteDescription(RTCSessionDescription(seen["offer_sdp"], "offer"))
        await rtc.set_local_description(answerer, await answerer.createAnswer(), ["127.0.0.1"])
        await offerer.setRemoteDescription(RTCSessionDescription(rtc.local_description_sdp(answerer), "answer"))
        await asyncio.wait_for(opened.wait(), 10)
        seen["open_s"] = time.monotonic() - started
        await asyncio.wait_for(ended.wait(), rtc.LATE_GATHER_TIMEOUT_S + 5)
        seen["late"] = late
        return seen
    finally:
        await offerer.close()
        await answerer.close()


def test_a_dead_stun_server_does_not_delay_the_offer_or_the_connect() -> None:
    with StunServer(answering=False) as dead:
        seen = asyncio.run(_pair(dead.url))
        assert dead.requests >= 1  # it was asked, and never answered
    assert seen["offer_s"] < NO_HANG_S and seen["open_s"] < NO_HANG_S
    assert seen["late_pending"]
    _, offered, end = protocol.split_sdp_candidates(seen["offer_sdp"])
    assert [c["candidate"].split()[7] for c in offered] == ["host"]
    assert not end  # more may follow: the offer must not claim end-of-candidates
    assert seen["late"] == []  # the watcher ended (None) without a candidate


def test_a_server_reflexive_candidate_follows_the_offer_through_the_watcher() -> None:
    with StunServer() as stun:
        seen = asyncio.run(_pair(stun.url))
    assert [c["candidate"].split()[7] for c in seen["late"]] == ["srflx"]
    _, offered, _ = protocol.split_sdp_candidates(seen["offer_sdp"])
    assert all(" typ host" in c["candidate"] for c in offered)


def test_with_another_aioice_gathering_is_stock_and_the_sdp_carries_everything(mocker) -> None:
    rtc.override_supported.cache_clear()
    mocker.patch.dict(rtc._KNOWN_SOURCES, {"gather_candidates": "0" * 64})
    try:
        with StunServer() as stun:
            seen = asyncio.run(_pair(stun.url))
    finally:
        rtc.override_supported.cache_clear()
    assert not seen["late_pending"] and seen["late"] == []
    _, offered, end = protocol.split_sdp_candidates(seen["offer_sdp"])
    assert sorted(c["candidate"].split()[7] for c in offered) == ["host", "srflx"] and end


@pytest.fixture(scope="module")
def echo() -> EchoServer:
    with EchoServer() as server:
        yield server


@pytest.mark.parametrize("trickle", [True, False], ids=["trickle", "non-trickle"])
def test_a_dead_stun_server_on_both_sides_costs_nothing_beside_a_working_host_path(
        echo: EchoServer, trickle: bool) -> None:
    with StunServer(answering=False) as dead:
        resources = [{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}]
        with EmbeddedGateway(make_config(resources, ice_servers=[dead.url])) as gw:
            loop = BackgroundLoop()
            router = RouterClient(gw.router_url, gw.user_token("alice"))
            try:
                started = time.monotonic()
                session = open_session(loop, router, gw.gateway_name, "echo", protocol.SessionRequest(),
                                       ice_servers=rtc.ice_servers_from_config([dead.url]),
                                       host_addresses=["127.0.0.1"],
                                       options=ConnectOptions(trickle=trickle, timeout_s=15))
                elapsed = time.monotonic() - started
                try:
                    assert elapsed < NO_HANG_S, f"connect took {elapsed:.2f} s"
                    assert rtc.selected_pair_types(session.peer.pc) == ("host", "host")
                finally:
                    session.close()
            finally:
                router.close()
                loop.stop()
        assert dead.requests >= 2  # both sides asked it


def test_with_nothing_to_trickle_the_offer_carries_everything_and_no_candidate_action_follows(
        echo: EchoServer) -> None:
    resources = [{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}]
    with EmbeddedGateway(make_config(resources)) as gw:
        loop = BackgroundLoop()
        router = RouterClient(gw.router_url, gw.user_token("alice"))
        try:
            session = open_session(loop, router, gw.gateway_name, "echo", protocol.SessionRequest(),
                                   ice_servers=[], host_addresses=["127.0.0.1"])
            session.close()
            assert gw.router.conversation_stats[session.conversation_id]["icecandidate"] == 0
        finally:
            router.close()
            loop.stop()
