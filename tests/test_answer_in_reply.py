"""Trickle mode pays no stream round trip for the answer: a current gateway puts it in the offer's
reply, and a client applies an answer from the reply or the stream, whichever is first, once.

Real router and gateway (EmbeddedGateway), real aiortc peers on 127.0.0.1. The time this saves on
a real network is measured by benchmarks/netlab_connect.py, not here.
"""
from __future__ import annotations

import threading
from typing import Any

import pytest

from commander_pam_plugin import negotiation, protocol
from commander_pam_plugin.gateway.agent import GatewayAgent
from commander_pam_plugin.gateway.embedded import EmbeddedGateway
from commander_pam_plugin.loop import BackgroundLoop
from commander_pam_plugin.negotiation import ConnectOptions, RouterClient, open_session
from commander_pam_plugin.peer import ClientPeer
from gateway_support import EchoServer, make_config

BOUND_S = 15  # "it did not hang"


class _Checkpoints:
    def __init__(self) -> None:
        self.names: list[str] = []

    def checkpoint(self, name: str) -> None:
        self.names.append(name)


@pytest.fixture
def echo():
    with EchoServer() as server:
        yield server


def _connect(gw: EmbeddedGateway, options: ConnectOptions, timing: Any = None) -> tuple[str, list[str]]:
    loop = BackgroundLoop()
    router = RouterClient(gw.router_url, gw.user_token("alice"))
    try:
        session = open_session(loop, router, gw.gateway_name, "echo", protocol.SessionRequest(),
                               ice_servers=[], host_addresses=["127.0.0.1"], timing=timing, options=options)
        session.close()
        return session.conversation_id, timing.names if timing else []
    finally:
        router.close()
        loop.stop()


def test_a_trickle_offer_gets_its_answer_in_the_reply_and_none_on_the_stream(echo, mocker) -> None:
    resources = [{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}]
    emitted = mocker.spy(GatewayAgent, "emit")
    with EmbeddedGateway(make_config(resources)) as gw:
        cid, names = _connect(gw, ConnectOptions(trickle=True, timeout_s=BOUND_S), _Checkpoints())
    assert "answer_received" in names and "offer_acked" not in names, names
    answers = [c for c in emitted.call_args_list if c.args[1] == cid and c.args[2].get("type") == "answer"]
    assert answers == []


def test_a_client_that_reads_only_the_stream_still_gets_the_answer_there(echo, mocker) -> None:
    """Keeper-style clients (no answer_in_reply in the offer) see exactly the old trickle reply."""
    resources = [{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}]
    with EmbeddedGateway(make_config(resources)) as gw:
        _, names = _connect(gw, ConnectOptions(trickle=True, legacy_ws_ready_wait=True, timeout_s=BOUND_S),
                            _Checkpoints())
    assert "offer_acked" in names and "answer_received" in names, names


def test_an_answer_sent_both_in_the_reply_and_on_the_stream_is_applied_once(echo, mocker) -> None:
    resources = [{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}]
    original = GatewayAgent._offer

    async def offer_twice(self, action, user):  # a gateway that sends its answer both ways
        reply, later = await original(self, action, user)
        if reply.get("sdp"):
            self.emit(action.conversation_id, {"type": "answer", "sdp": reply["sdp"]})
        return reply, later

    mocker.patch.object(GatewayAgent, "_offer", offer_twice)
    applied = mocker.spy(ClientPeer, "apply_answer")
    stream_answer_handled = threading.Event()
    handle = negotiation._on_stream_event

    def watched(loop, holder, event, phase, once):
        handle(loop, holder, event, phase, once)
        if event.get("type") == "answer":
            stream_answer_handled.set()

    mocker.patch.object(negotiation, "_on_stream_event", watched)
    with EmbeddedGateway(make_config(resources)) as gw:
        _connect(gw, ConnectOptions(trickle=True, timeout_s=BOUND_S))
        assert stream_answer_handled.wait(BOUND_S)
    assert applied.call_count == 1
