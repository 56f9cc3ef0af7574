"""Reliability and security checks; run in full, they produce the table in docs/RELIABILITY.md.

    python benchmarks/reliability                  # full size, a few minutes, prints the table
    python benchmarks/reliability --write-doc      # ... and puts it into docs/RELIABILITY.md
    python benchmarks/reliability --quick --only fuzz,cycles --json out.json

Each check is a function returning a Row: what was tried, how many times, what survived and
what was lost (which must be nothing). The tests (tests/test_fuzz_live.py, test_security_*.py,
test_reliability_*.py) call the same functions at small sizes, so the table and the tests
cannot drift apart. Everything is real and on 127.0.0.1: `pam-gateway serve/router/agent`
processes (or the embedded stack where the test needs to look inside), aiortc peers, TCP
targets, an asyncssh server, the plugin's own runtime and shell.

One module per check family (fuzz, access, faults, timeouts, load, secret_scan, tenancy), the shared
stack helpers in `stack`, the run and the table in `table`.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
for _folder in (ROOT / "benchmarks", ROOT / "tests"):  # client_support, gateway_support, latency_proxy...
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from .access import access_control  # noqa: E402
from .faults import client_killed, gateway_killed, router_restarted  # noqa: E402
from .fuzz import fuzz  # noqa: E402
from .load import concurrent_sessions, echo_load, open_close_cycles  # noqa: E402
from .secret_scan import find_secrets, secrets_scan  # noqa: E402
from .stack import Row, echo_resource, to_toml  # noqa: E402
from .table import FULL, QUICK, checks, main  # noqa: E402
from .tenancy import tenancy, tenancy_table  # noqa: E402
from .timeouts import connect_timeouts, target_faults  # noqa: E402

__all__ = ["FULL", "QUICK", "ROOT", "Row", "access_control", "checks", "client_killed", "concurrent_sessions",
           "connect_timeouts", "echo_load", "echo_resource", "find_secrets", "fuzz", "gateway_killed", "main",
           "open_close_cycles", "router_restarted", "secrets_scan", "target_faults", "tenancy", "tenancy_table", "to_toml"]
