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
from .timeouts import connect_timeouts, target_faults


FULL = {"fuzz": dict(http=1600, streams=150, gateway_frames=150, channel=300), "gateway": 5, "router": 5,
        "client": 3, "targets": 20, "sessions": (50, 1024 * 1024), "cycles": 300}
QUICK = {"fuzz": dict(http=200, streams=20, gateway_frames=20, channel=40), "gateway": 1, "router": 1,
         "client": 1, "targets": 3, "sessions": (10, 256 * 1024), "cycles": 25}


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


def write_doc(markdown: str, note: str) -> None:
    """Replace the table between the markers in docs/RELIABILITY.md."""
    path = ROOT / "docs" / "RELIABILITY.md"
    text = path.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    path.write_text(text[:start] + f"\n{note}\n\n{markdown}\n" + text[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/reliability",
                                     description="Reliability and security checks: the table in docs/RELIABILITY.md.")
    parser.add_argument("--quick", action="store_true", help="the sizes the tests use")
    parser.add_argument("--only", help="comma-separated checks: " + ", ".join(FULL))
    parser.add_argument("--json", metavar="FILE", help="write every row and figure as JSON")
    parser.add_argument("--write-doc", action="store_true", help="put the table into docs/RELIABILITY.md (full runs)")
    parser.add_argument("--echo-load", metavar="PORTS", help=argparse.SUPPRESS)  # concurrent_sessions' child
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
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
