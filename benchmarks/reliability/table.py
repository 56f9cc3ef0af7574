"""The table: check sizes, the run, the markdown and docs/RELIABILITY.md."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from . import ROOT
from .access import access_control
from .faults import client_killed, gateway_killed, router_restarted
from .fuzz import fuzz
from .load import concurrent_sessions, echo_load, open_close_cycles
from .secret_scan import secrets_scan
from .stack import Row, TIME_BOUNDS
from .tenancy import tenancy, tenancy_table
from .timeouts import connect_timeouts, target_faults


FULL = {"fuzz": dict(http=1600, streams=150, gateway_frames=150, channel=300), "gateway": 5, "router": 5,
        "client": 3, "targets": 20, "sessions": (50, 1024 * 1024), "cycles": 300,
        "tenancy": dict(streams=1000, per_user=100, silent_mib=16, offers=10, times=20)}
QUICK = {"fuzz": dict(http=200, streams=20, gateway_frames=20, channel=40), "gateway": 1, "router": 1,
         "client": 1, "targets": 3, "sessions": (10, 256 * 1024), "cycles": 25,
        "tenancy": dict(streams=150, per_user=40, silent_mib=8, offers=2, times=2, idle_s=1.0)}


def checks(sizes: dict[str, Any], folder: Path) -> dict[str, Callable[[], Row]]:
    """Every check by short name, at the given sizes, in table order."""
    return {"fuzz": lambda: fuzz(**sizes["fuzz"]),
            "access": lambda: access_control(folder),
            "gateway": lambda: gateway_killed(sizes["gateway"], folder),
            "router": lambda: router_restarted(sizes["router"], folder),
            "client": lambda: client_killed(sizes["client"], folder),
            "targets": lambda: target_faults(sizes["targets"], folder),
            "timeouts": lambda: connect_timeouts(),
            "sessions": lambda: concurrent_sessions(*sizes["sessions"], folder),
            "cycles": lambda: open_close_cycles(sizes["cycles"], folder),
            "secrets": lambda: secrets_scan(folder)}


def apply_time_bounds(row: Row) -> Row:
    """The issue's time bounds, as lost entries of the row (benchmark runs only)."""
    for figure, bound in TIME_BOUNDS.get(row.check, []):
        late = [t for t in row.figures.get(figure, []) if t > bound]
        if late:
            row.fail(f"{figure}: {max(late):.1f} s, over the bound of {bound:g} s")
    return row


def table(rows: list[Row]) -> str:
    lines = ["| check | what was tried | times | what survived | lost |", "|---|---|---:|---|---:|"]
    for row in rows:
        lost = str(row.lost) if not row.failures else f"{row.lost}: " + "; ".join(row.failures[:3])
        cells = (row.check, row.tried, str(row.times), row.survived, lost)
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


BEGIN, END = "<!-- reliability table: begin -->", "<!-- reliability table: end -->"


TENANCY_BEGIN, TENANCY_END = "<!-- tenancy table: begin -->", "<!-- tenancy table: end -->"


def write_doc(markdown: str, note: str, begin: str = BEGIN, end_marker: str = END) -> None:
    """Replace the table between the markers in docs/RELIABILITY.md."""
    path = ROOT / "docs" / "RELIABILITY.md"
    text = path.read_text()
    start, end = text.index(begin) + len(begin), text.index(end_marker)
    path.write_text(text[:start] + f"\n{note}\n\n{markdown}\n" + text[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/reliability",
                                     description="Reliability and security checks: the table in docs/RELIABILITY.md.")
    parser.add_argument("--quick", action="store_true", help="the sizes the tests use")
    parser.add_argument("--only", help="comma-separated checks: " + ", ".join(FULL)
                        + " (tenancy has a table of its own; `--only tenancy --write-doc` writes just that one)")
    parser.add_argument("--json", metavar="FILE", help="write every row and figure as JSON")
    parser.add_argument("--write-doc", action="store_true", help="put the table into docs/RELIABILITY.md (full runs)")
    parser.add_argument("--echo-load", metavar="PORTS", help=argparse.SUPPRESS)  # concurrent_sessions' child
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only == "tenancy" and not args.quick:
        return tenancy_main(args.json, args.write_doc)
    if args.write_doc and (args.quick or args.only):
        parser.error("--write-doc takes a full run (no --quick, no --only)")
    if args.echo_load:
        print(json.dumps(echo_load([int(p) for p in args.echo_load.split(",")], args.size)), flush=True)
        return 0
    logging.getLogger().addHandler(logging.NullHandler())  # rows carry what matters; expected warnings stay quiet
    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="pam-reliability-") as tmp:
        selected = checks(sizes, Path(tmp))
        names_wanted = args.only.split(",") if args.only else list(selected)
        rows = []
        for name in names_wanted:
            if name == "tenancy":
                tenancy_rows = tenancy(**sizes["tenancy"])
                print(tenancy_table(tenancy_rows))
                rows.append(Row("tenancy", "every class of issue 10 (table of its own)", len(tenancy_rows),
                                f"{sum(r.held is True for r in tenancy_rows)} held"))
                for held_not in (r for r in tenancy_rows if r.held is False):
                    rows[-1].fail(f"{held_not.check}: {held_not.attacker_got}")
                continue
            started = time.monotonic()
            rows.append(apply_time_bounds(selected[name]()))
            print(f"{name}: {rows[-1].lost} lost ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    markdown = table(rows)
    print(markdown)
    note = (f"Run {datetime.now().strftime('%Y-%m-%d')} with `python benchmarks/reliability"
            f"{' --quick' if args.quick else ''}` on {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
            "everything on 127.0.0.1 (client, router, gateway and targets share the cores).")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2, default=str))
    if args.write_doc:
        write_doc(markdown, note)
    return 1 if any(r.lost for r in rows) else 0


def tenancy_main(json_path: str | None, doc: bool) -> int:
    """The tenancy check alone, at full size: its table, its JSON, its section of RELIABILITY.md."""
    started = time.monotonic()
    rows = tenancy(**FULL["tenancy"])
    print(f"tenancy: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    markdown = tenancy_table(rows)
    print(markdown)
    if json_path:
        Path(json_path).write_text(json.dumps([asdict(r) for r in rows], indent=2, default=str))
    if doc:
        write_doc(markdown, f"Run {datetime.now().strftime('%Y-%m-%d')} with `python benchmarks/reliability --only "
                  f"tenancy --write-doc` on {os.cpu_count()} cores, Python {sys.version.split()[0]}, everything on "
                  "127.0.0.1 in one process (embedded router and gateway, aiortc peers, TCP targets).",
                  TENANCY_BEGIN, TENANCY_END)
    return 1 if any(r.held is False for r in rows) else 0
