"""A bounded fuzz run against a live router and gateway while an honest tunnel keeps moving data.

The same function runs at full size (2,000+ requests and messages) in benchmarks/reliability/.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import reliability  # noqa: E402


def test_generated_requests_and_messages_get_no_5xx_and_never_stop_an_honest_tunnel():
    sizes = reliability.QUICK["fuzz"]
    row = reliability.fuzz(**sizes)
    assert row.lost == 0, row.failures
    counts = row.figures["counts"]
    assert counts["http requests"] == sizes["http"]
    assert counts["HTTP 400"] and counts["HTTP 200"]  # generation reached the validators and real offers
    assert counts["stream messages"] and counts["gateway-link messages"] and counts["data-channel messages"]
    assert counts["gateway hellos welcomed"] and counts["gateway hellos refused"]
    assert row.figures["honest_bytes"] > 0
