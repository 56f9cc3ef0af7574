"""Unit tests of the flow-control arithmetic and the [gateway.limits] table (no network)."""
from __future__ import annotations

import asyncio

import pytest

from commander_pam_plugin.flow import BufferBudget, ReceiveWindow, SendCredit, parse_credit, parse_window
from commander_pam_plugin.gateway.config import ConfigError, config_from_dict
from commander_pam_plugin.gateway.limits import ConnectionQuota, GatewayLimits, RateBucket
from gateway_support import make_config


def test_credit_is_cumulative_and_a_sender_waits_for_it() -> None:
    async def main() -> list:
        credit = SendCredit(100)
        credit.spend(100)
        waiter = asyncio.ensure_future(credit.wait())
        await asyncio.sleep(0)
        assert not waiter.done()
        credit.grant(90)  # older, smaller limit: ignored
        await asyncio.sleep(0)
        assert not waiter.done()
        credit.grant(164)
        return [await waiter, SendCredit(None).allowance]
    assert asyncio.run(main()) == [64, None]


def test_the_receiver_grants_every_quarter_window_and_enforces_its_bounds() -> None:
    budget = BufferBudget(320)
    first, second = ReceiveWindow(100, bound=150, budget=budget), ReceiveWindow(100, bound=150, budget=budget)
    assert first.receive(100) is None and first.deliver(10) is None and first.deliver(15) == 125
    assert "the limit is 150" in (first.receive(100) or "")  # 175 held on one stream
    assert second.receive(140) is None
    assert "the session holds" in (second.receive(10) or "")  # 175 + 150 held in the session, over 320
    first.release()
    assert budget.used == 150


def test_windows_and_credit_from_the_wire_are_checked() -> None:
    assert parse_window(1 << 20) == 1 << 20
    assert [parse_window(v) for v in (None, True, "1048576", 10, 1 << 40)] == [None] * 5
    assert parse_credit({"limit": 5}) == 5
    assert [parse_credit({"limit": v}) for v in (-1, 1.5, True, 1 << 70)] == [None] * 4


def test_limits_table_defaults_sizing_and_errors() -> None:
    limits = GatewayLimits().resolved(nofile=1024)
    assert (limits.connections_per_gateway, limits.connections_per_user) == (448, 112)
    parsed = config_from_dict(make_config([], limits={"streams_per_session": 5, "resizes_per_s": 2})).gateway.limits
    assert (parsed.streams_per_session, parsed.resizes_per_s) == (5, 2.0)
    for bad in ({"streams_per_session": 0}, {"nosuch": 1}, {"stream_window": 1 << 20, "stream_buffer_bytes": 1 << 17},
                {"allow_loopback_candidates": "yes"}):
        with pytest.raises(ConfigError, match="limits"):
            config_from_dict(make_config([], limits=bad))


def test_connection_quota_per_user_and_per_gateway_and_rate_bucket() -> None:
    quota = ConnectionQuota(GatewayLimits(connections_per_user=2, connections_per_gateway=3))
    assert [quota.acquire("a"), quota.acquire("a")] == [None, None]
    assert "per user" in quota.acquire("a")
    assert quota.acquire("b") is None and "the gateway has 3" in quota.acquire("c")
    quota.release("a")
    assert quota.acquire("c") is None
    bucket = RateBucket(rate=10, burst=2, now=0.0)
    assert [bucket.take(0.0), bucket.take(0.0), bucket.take(0.0), bucket.take(0.1)] == [True, True, False, True]
