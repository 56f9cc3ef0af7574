"""The benchmarks run end to end with tiny parameters and write the JSON keys they promise.

No timing is asserted here (figures belong to the benchmarks, not to tests): only that each
script completes against real router, gateway and target processes and reports its figures.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / f"{script}.json"
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--json", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(out.read_text())
    # The printed verdicts are the JSON's: each target once, with the state the JSON holds.
    assert written["targets"], "no target was evaluated"
    for name, met in written["targets"].items():
        assert f"  {'met ' if met else 'MISS'} {name}\n" in result.stdout, (name, met, result.stdout)
    return written


def _keys(tree: Any) -> set[str]:
    if isinstance(tree, dict):
        return set(tree) | {k for v in tree.values() for k in _keys(v)}
    return set()


def test_connect_reports_every_profile_with_legacy_and_floor_ratios(tmp_path: Path) -> None:
    result = _run("connect.py", tmp_path, "--runs", "1", "--one-way-ms", "5", "--host-addresses", "2")
    for command in ("tunnel", "launch"):
        legacy = result[command]["legacy"]
        assert legacy["ready_ms"]["n"] == 1
        assert legacy["actions"]["median"] > result[command]["trickle"]["actions"]["median"] >= 1
        for profile in ("trickle", "non-trickle"):
            entry = result[command][profile]
            assert {"ready_ms", "ready_ms_d0", "ready_ms_cold", "floor_ms", "phases_ms"} <= set(entry)
            assert entry["ratio_to_floor"] > 0 and entry["ratio_legacy_over_this"] > 0
    ratio_keys = [k for k in _keys(result) if "ratio" in k]
    assert any("legacy" in k for k in ratio_keys) and any("floor" in k for k in ratio_keys)
    assert result["ping_ms"]["median"] > 0 and result["meta"]["one_way_ms"] == 5


def test_throughput_compares_tunnel_and_direct_with_checked_transfers(tmp_path: Path) -> None:
    result = _run("throughput.py", tmp_path, "--mib", "2", "--runs", "1", "--connections", "1,2")
    meta = result["meta"]  # the machine it ran on: CPU model and load average, never overwritten
    assert meta["cpu"] and not meta["cpu"].startswith("CPU ms per MB") and "cpu_note" in meta
    assert len(meta["loadavg_1_5_15"]) == 3
    assert set(result["connections"]) == {"1", "2"}
    for entry in result["connections"].values():
        for direction in ("upload", "download"):
            figures = entry[direction]
            assert figures["tunnel_mbps"] > 0 and figures["direct_mbps"] > 0
            assert figures["ratio_tunnel_to_direct"] > 0


def test_concurrency_opens_every_tunnel_and_checks_every_transfer(tmp_path: Path) -> None:
    tunnels = 4
    written = _run("concurrency.py", tmp_path, "--tunnels", str(tunnels), "--single-runs", "1",
                   "--one-way-ms", "5", "--kib", "16", "--rounds", "1")
    assert set(written["variants"]) == {"before", "tuned"}
    for variant in written["variants"].values():
        (result,) = variant["rounds"]
        assert result["opened"] == tunnels and result["failed_to_open"] == 0
        assert result["transfers_intact"] == tunnels
        assert result["concurrent_ready_ms"]["p95"] > 0 and result["ratio_p95_to_single_median"] > 0
        assert result["gateway_rss_kib"]["all_up"] > 0 and "gateway_rss_kib_per_session" in result
        assert result["cpu_ms_per_setup"]["client"] >= 0 and result["cpu_ms_per_setup"]["gateway"] >= 0


def test_latency_runs_stock_and_tuned_stacks_side_by_side(tmp_path: Path) -> None:
    # Two stacks in one run whose gateways share a name: each needs its own control socket.
    result = _run("latency.py", tmp_path, "--rounds", "1", "--echoes", "20", "--redis-requests", "200")
    assert {"direct", "ssh -L", "pam stock", "pam tuned"} <= _keys(result), sorted(_keys(result))[:40]
