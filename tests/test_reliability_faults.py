"""Faults, each with the line a user sees: gateway killed, router restarted, client killed,
targets refusing or resetting, a connect phase that stalls. Real processes throughout.

The issue's time bounds (5 s to notice a dead gateway, 10 s to free a dead client's peer) are
measured by benchmarks/reliability/, not asserted here: these tests wait generously and check
what happened.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import reliability  # noqa: E402
from gateway_support import RouterClient, make_config, new_conversation_id, run  # noqa: E402

from commander_pam_plugin.gateway.agent import BACKOFF_MAX_S, BACKOFF_MIN_S, backoff_delays  # noqa: E402
from commander_pam_plugin.gateway.config import config_from_dict  # noqa: E402
from commander_pam_plugin.gateway.router import Router  # noqa: E402


def test_a_killed_gateway_is_reported_by_tunnel_and_launch_and_a_new_tunnel_works_once_it_is_back(tmp_path):
    row = reliability.gateway_killed(1, tmp_path)
    assert row.lost == 0, row.failures
    lines = row.figures["lines"]
    assert any(line.startswith("tunnel t") and " lost: " in line for line in lines), lines
    assert any("connection to the gateway lost" in line for line in lines), lines


def test_the_agent_redials_a_restarted_router_and_tunnels_keep_working(tmp_path):
    row = reliability.router_restarted(1, tmp_path)
    assert row.lost == 0, row.failures
    (gaps,) = row.figures["gaps_between_redials_s"]
    assert len(gaps) >= 2  # it was refused at least once and kept trying


def test_redial_waits_double_up_to_the_cap_each_with_jitter():
    first = list(itertools.islice(backoff_delays(random.Random(1)), 12))
    nominal = [min(BACKOFF_MIN_S * 2 ** i, BACKOFF_MAX_S) for i in range(12)]
    assert all(n / 2 <= d <= n for d, n in zip(first, nominal)), list(zip(first, nominal))
    assert first != list(itertools.islice(backoff_delays(random.Random(2)), 12))  # jittered, not in step


def test_a_killed_client_is_freed_by_the_gateway_mid_session_and_mid_negotiation(tmp_path):
    row = reliability.client_killed(1, tmp_path, ice_timeout=3.0)  # the default (8 s) is the benchmark's
    assert row.lost == 0, row.failures
    assert len(row.figures["mid-session_freed_s"]) == len(row.figures["mid-negotiation_freed_s"]) == 1


def test_a_refusing_or_resetting_target_ends_that_connection_with_a_reason_and_the_tunnel_stays_up(tmp_path):
    row = reliability.target_faults(3, tmp_path)
    assert row.lost == 0, row.failures
    tunnels = row.figures["tunnels"]
    assert tunnels["refusing"]["last_error"] == "refusing refused the connection"
    # reset once connected, or already while connecting: either way the reason says so
    assert tunnels["flaky"]["last_error"] in ("target connection failed (ConnectionResetError)",
                                              "cannot connect to flaky (BrokenPipeError)",
                                              "cannot connect to flaky (ConnectionResetError)")


def test_a_connect_timeout_names_the_phase_that_stalled():
    row = reliability.connect_timeouts(timeout_s=2.0)
    assert row.lost == 0, row.failures
    assert json.dumps(row.figures["messages"]).count("timed out after 2 s waiting for") == 3


def test_the_router_forgets_conversations_no_gateway_will_end():
    """A client's close while its gateway cannot answer, and a stream that closes after its gateway
    went offline: neither may hold one of the user's 64 conversations forever."""
    data = make_config(router={"reply_timeout": 0.5})
    config = config_from_dict(data)

    async def main():
        router = Router(config.router)
        url = await router.start("127.0.0.1", 0)
        try:
            async with RouterClient(url, data["users"][0]["token"]) as alice:
                gateway = await alice.http.ws_connect(f"{url}/api/v1/gateway/connect",
                                                      headers={"Authorization": f"Bearer {data['gateway']['token']}"})
                await gateway.send_json({"type": "hello", "gateway": "gw-test", "version": "1.8.0"})
                assert json.loads((await gateway.receive()).data) == {"type": "welcome"}
                silent = new_conversation_id()
                status, _ = await alice.action("gw-test", silent, "close")
                assert status == 504 and silent not in router.conversations

                streamed = new_conversation_id()
                stream = await alice.stream(streamed)
                pending = asyncio.ensure_future(alice.action("gw-test", streamed, "icecandidate",
                                                             {"candidates": [], "end_of_candidates": True}))
                action = {}
                while action.get("kind") != "icecandidate":  # the unanswered close came first
                    action = json.loads((await gateway.receive()).data)
                await gateway.send_json({"type": "reply", "id": action["id"], "ok": True, "data": {"applied": 0}})
                assert (await pending)[0] == 200 and router.conversations[streamed].gateway == "gw-test"
                await gateway.close()  # the gateway goes offline, and its sessions with it
                await stream.close()
                while streamed in router.conversations:
                    await asyncio.sleep(0.01)  # the router notices the stream close on its own loop
        finally:
            await router.stop()

    run(main())
