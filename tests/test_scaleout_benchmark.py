"""benchmarks/scaleout.py still runs end to end (tiny sizes; its figures are not checked here)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "scaleout.py"


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed (.ci/run installs it)")
def test_the_scaleout_benchmark_runs_and_every_tunnel_is_intact(tmp_path: Path) -> None:
    out = tmp_path / "scaleout.json"
    done = subprocess.run([sys.executable, str(BENCHMARK), "--sessions", "3", "--users", "2", "--kib", "8",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [row["label"] for row in result["configurations"]] == ["1 node, in memory", "3 nodes, Redis"]
    assert all(result["targets"].values()), result["targets"]
    assert result["configurations"][1]["redis_ops"]["raw_per_connect"] > 0  # Redis really was used
