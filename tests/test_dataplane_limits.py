"""Quotas, hostile control messages, the remote-candidate policy and abnormal ends.

Real router and gateway (in their own process where descriptors or a kill matter), real
aiortc peers, real TCP on 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import pytest

from client_support import echo_roundtrip, payload, sha256
from commander_pam_plugin.config import PamConfig
from commander_pam_plugin.gateway.candidate_policy import CandidatePolicy
from commander_pam_plugin.gateway.config import config_from_dict
from commander_pam_plugin.gateway.embedded import EmbeddedGateway
from commander_pam_plugin.gateway.limits import GatewayLimits, default_connections_per_gateway
from commander_pam_plugin.runtime import PamRuntime
from dataplane_support import LimitedGateway, ModeTarget
from gateway_support import (WAIT, EchoServer, RouterClient, connect, demo_ssh_server, make_config,
                             run, ssh_resource)


def _collect_control(session) -> list[dict]:
    seen: list[dict] = []
    session.peer.control.channel.on("message", lambda m: seen.append(json.loads(m)) if isinstance(m, str) else None)
    return seen


async def _echo_stream(session, stream_id: int, data: bytes) -> bytes:
    reader, reply = await session.peer.open_stream(stream_id)
    assert reply["op"] == "opened", reply
    for start in range(0, len(data), 16384):
        reader.send(data[start:start + 16384])
    reader.send_control("eof")
    received, end = await reader.read_until("eof", timeout=30)
    assert end == {"op": "eof"}, end
    return received


# --- descriptor quotas, under ulimit -n 1024 --------------------------------------------------

def test_one_user_opening_a_thousand_streams_is_refused_past_his_quota_and_others_keep_working(
        tmp_path: Path) -> None:
    with EchoServer() as echo:
        # the control-message rate is not what this test is about: only the descriptor quotas refuse
        config = make_config([{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}],
                             limits={"control_messages_per_s": 100_000})
        gateway = LimitedGateway(config, tmp_path, nofile=1024)
        try:
            assert any("descriptor limit 1024" in line for line in gateway.log), gateway.log
            per_gateway = default_connections_per_gateway(1024)
            per_user = per_gateway // 4

            async def main() -> tuple[list[dict], int]:
                async with RouterClient(gateway.router_url, gateway.user_token("alice")) as alice, \
                        RouterClient(gateway.router_url, gateway.user_token("bob")) as bob:
                    honest = await connect(bob, gateway.gateway_name, "echo")
                    before = payload(256 * 1024, 1)
                    assert sha256(await _echo_stream(honest, 2, before)) == sha256(before)
                    attacker = await connect(alice, gateway.gateway_name, "echo")
                    replies = await asyncio.gather(*(attacker.peer.open_stream(i) for i in range(2, 1002)))
                    fds = gateway.open_fds()
                    # bob's live tunnel and a new session of his still work
                    during = payload(512 * 1024, 2)
                    assert sha256(await _echo_stream(honest, 3, during)) == sha256(during)
                    fresh = await connect(bob, gateway.gateway_name, "echo")
                    assert sha256(await _echo_stream(fresh, 2, during)) == sha256(during)
                    for s, c in ((honest, bob), (fresh, bob), (attacker, alice)):
                        await s.close(c, gateway.gateway_name)
                    return [reply for _, reply in replies], fds
            replies, fds = run(main(), timeout=240)
        finally:
            gateway.stop()
    opened = [r for r in replies if r["op"] == "opened"]
    refused = [r for r in replies if r["op"] == "refused"]
    assert len(opened) == per_user and len(refused) == 1000 - per_user
    assert all("limit per user" in r["reason"] for r in refused), refused[:3]
    assert fds < 1024 - 100, f"the gateway held {fds} descriptors"


def test_streams_per_session_and_an_old_client_past_the_stream_buffer_are_refused_with_reasons() -> None:
    target = ModeTarget()
    limits = {"streams_per_session": 3, "stream_window": 256 * 1024, "stream_buffer_bytes": 512 * 1024}
    try:
        with EmbeddedGateway(make_config([{"name": "mode", "kind": "tcp", "host": "127.0.0.1",
                                           "port": target.port}], limits=limits)) as gw:
            async def main() -> None:
                async with RouterClient(gw.router_url, gw.user_token("alice")) as c:
                    session = await connect(c, gw.gateway_name, "mode")
                    # an old client: no "window" in its open, and it ignores credit
                    silent, reply = await session.peer.open_stream(2)
                    assert reply["op"] == "opened" and reply["window"] == 256 * 1024
                    silent.send(b"Q")
                    for _ in range(512):  # 8 MiB at a target that never reads (kernel buffers take some)
                        silent.send(b"x" * 16384)
                    _, end = await silent.read_until("never", timeout=30)
                    assert end is not None and end["op"] == "error" and "the limit is 524288" in end["reason"], end
                    streams = [await session.peer.open_stream(i) for i in (3, 4, 5, 6)]
                    assert [r["op"] for _, r in streams] == ["opened", "opened", "opened", "refused"]
                    assert "3 open streams, its limit" in streams[3][1]["reason"]
                    echo, _ = streams[0]
                    echo.send(b"E" + b"still here")
                    assert await echo.receive(timeout=WAIT) == b"still here"
                    await session.close(c, gw.gateway_name)
            run(main())
    finally:
        target.close()


# --- hostile but well-formed control messages ---------------------------------------------------

def test_hostile_control_messages_are_refused_with_a_reason_and_the_session_lives() -> None:
    with EchoServer() as echo, EmbeddedGateway(make_config(
            [{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}])) as gw:
        hostile = ['{"op":"open","id":1' + "0" * 4300 + "}",  # a 4.3 KB integer
                   '{"op":"open","id":' + "9" * 40 + "}", '{"op":"open","id":"2"}', '{"op":"open","id":true}',
                   '{"op":"launch-missiles"}', '{"op":7}', "[1,2,3]", "not json", '{"op":"resize","cols":1e999}']

        async def main() -> list[dict]:
            async with RouterClient(gw.router_url, gw.user_token("alice")) as c:
                session = await connect(c, gw.gateway_name, "echo")
                seen = _collect_control(session)
                for text in hostile:
                    session.peer.control.send(text)
                session.peer.control.send(b"binary on control")
                session.peer.control.send_control("ping")
                deadline = time.monotonic() + WAIT
                while not any(m.get("op") == "pong" for m in seen) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                data = payload(128 * 1024, 3)
                assert sha256(await _echo_stream(session, 2, data)) == sha256(data)
                # the same on a stream channel, in-band: ignored, the stream goes on
                reader, reply = await session.peer.open_stream(3)
                reader.send('{"op":"eof","n":1' + "0" * 4300 + "}")
                reader.send(b"after")
                assert await reader.receive(timeout=WAIT) == b"after"
                await session.close(c, gw.gateway_name)
                return seen
        seen = run(main())
    refused = [m for m in seen if m.get("op") == "refused"]
    assert len(refused) == len(hostile) + 1, seen  # every one answered, none ignored silently
    assert all(isinstance(m.get("reason"), str) and m["reason"] for m in refused)


def test_twenty_thousand_resizes_are_coalesced_and_the_session_lives(tmp_path: Path) -> None:
    recordings = tmp_path / "casts"
    with demo_ssh_server() as ssh, EmbeddedGateway(make_config([ssh_resource(ssh, "rec", record=True)],
                                                               recordings_dir=str(recordings))) as gw:
        async def main() -> tuple[int, float]:
            async with RouterClient(gw.router_url, gw.user_token("alice")) as c:
                session = await connect(c, gw.gateway_name, "rec", session={
                    "mode": "terminal", "term": "xterm", "cols": 80, "rows": 24, "command": "read line", "pty": True})
                started = time.monotonic()
                for i in range(20_000):
                    session.peer.control.send_control("resize", cols=10 + i % 500, rows=24)
                session.peer.control.send_control("resize", cols=123, rows=45)
                await asyncio.sleep(0)
                answerer = gw.run(_session(gw, session.conversation_id))
                deadline = time.monotonic() + 60
                while gw.run(_size(answerer)) != (123, 45) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                elapsed = time.monotonic() - started
                assert gw.run(_size(answerer)) == (123, 45), "the last size was not applied"
                session.peer.terminal.send(b"\n")
                _, end = await session.peer.terminal.read_until("exit", timeout=30)
                assert end == {"op": "exit", "status": 0}
                applied = answerer.resizes_applied
                await session.close(c, gw.gateway_name)
                return applied, elapsed
        applied, elapsed = run(main(), timeout=120)
    lines = next(recordings.iterdir()).read_text().splitlines()
    resizes = [line for line in lines[1:] if json.loads(line)[1] == "r"]
    limit = GatewayLimits().resizes_per_s * (elapsed + 1) + 2
    print(f"\n20,001 resizes in {elapsed:.1f} s: {applied} applied, {len(resizes)} recorded")
    assert applied <= limit and len(resizes) <= applied


async def _session(gw: EmbeddedGateway, conversation_id: str):
    return gw.agent.sessions[conversation_id]


async def _size(answerer) -> tuple[int, int]:
    return answerer.ssh._size


# --- remote candidates --------------------------------------------------------------------------

def _settings(**limits):
    config = make_config([{"name": "t", "kind": "tcp", "host": "100.64.0.2", "port": 5432}],
                         host_addresses=["127.0.0.1"], limits=limits)
    return config_from_dict(config).gateway


def test_the_candidate_policy_refuses_probing_targets_and_allows_loopback_only_when_switched_on() -> None:
    strict = CandidatePolicy.for_gateway(_settings(allow_loopback_candidates=False), False, "http://100.64.0.1:8080")
    assert "loopback" in strict.refusal("127.0.0.1", 40000)
    assert "loopback" in strict.refusal("::1", 40000)
    assert strict.refusal("169.254.1.1", 40000) and strict.refusal("fe80::1", 40000)
    assert strict.refusal("224.0.0.251", 5353) and strict.refusal("0.0.0.0", 9)
    assert strict.refusal("printer.local", 40000)
    assert strict.refusal("100.64.0.9", 40000) is None
    assert "own services" in strict.refusal("100.64.0.1", 8080) and "own services" in strict.refusal("100.64.0.2", 5432)
    lab = CandidatePolicy.for_gateway(_settings(), None, "http://127.0.0.1:8080")  # auto: loopback-only gateway
    assert lab.refusal("127.0.0.1", 40000) is None and lab.refusal("127.0.0.1", 8080) is None
    assert "own services" in lab.refusal("100.64.0.2", 5432)


def test_dropped_candidates_are_not_reported_as_applied() -> None:
    from gateway_support import ClientPeer, new_conversation_id
    from commander_pam_plugin.protocol import split_sdp_candidates

    with EchoServer() as echo, EmbeddedGateway(make_config(
            [{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}],
            limits={"allow_loopback_candidates": False})) as gw:
        async def main() -> list[int]:
            async with RouterClient(gw.router_url, gw.user_token("alice")) as c:
                cid = new_conversation_id()
                peer = ClientPeer()
                bare, wire, _ = split_sdp_candidates(await peer.offer())
                status, _ = await c.action(gw.gateway_name, cid, "offer",
                                           {"type": "offer", "sdp": bare, "resource": "echo",
                                            "session": {"mode": "tunnel"}})
                assert status == 200
                applied = []
                for batch in ({"candidates": wire}, {"candidates": [], "end_of_candidates": True},
                              {"candidates": [{**wire[0], "candidate": wire[0]["candidate"].replace(
                                  "127.0.0.1", "100.64.0.1")}]}):
                    status, body = await c.action(gw.gateway_name, cid, "icecandidate", batch)
                    assert status == 200, body
                    applied.append(body["data"]["applied"])
                await c.action(gw.gateway_name, cid, "close")
                await peer.close()
                return applied
        assert run(main()) == [0, 0, 0]  # loopback by policy, then anything after end-of-candidates


# --- abnormal ends reach the local application as a reset ------------------------------------------

def test_a_gateway_kill_reads_as_a_reset_and_a_normal_end_as_eof(tmp_path: Path) -> None:
    target = ModeTarget()
    gateway = LimitedGateway(make_config([{"name": "mode", "kind": "tcp", "host": "127.0.0.1",
                                           "port": target.port}]), tmp_path)
    runtime = PamRuntime(PamConfig(router_url=gateway.router_url, token=gateway.user_token("alice"),
                                   host_addresses=("127.0.0.1",)))
    try:
        tunnel = runtime.start_tunnel(None, runtime.resolve(None, "mode"), "127.0.0.1", 0, trickle=True)
        assert echo_roundtrip(tunnel.port, b"E" + b"normal end") == b"normal end"  # read to EOF
        with socket.create_connection(("127.0.0.1", tunnel.port), timeout=30) as reset:
            reset.sendall(b"R" + b"x" * 65536)
            with pytest.raises(ConnectionResetError):
                while reset.recv(65536):
                    pass
        with socket.create_connection(("127.0.0.1", tunnel.port), timeout=30) as download:
            download.sendall(b"D")
            assert download.recv(65536)
            gateway.kill()
            with pytest.raises(ConnectionResetError):
                while download.recv(65536):
                    pass
    finally:
        runtime.shutdown()
        gateway.stop()
        target.close()
