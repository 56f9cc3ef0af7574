"""The tenancy check of benchmarks/reliability at small sizes: every class it runs holds, its
cells are computed from what happened, and the honest user's tunnel moved checked data during
each attack. The full-size table is docs/RELIABILITY.md's "Tenancy" section."""
from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import reliability  # noqa: E402


def test_every_tenancy_class_run_here_holds_while_the_honest_tunnel_stays_intact():
    rows = {(row.check if row.check.startswith("slots") else row.check.split(" (")[0]): row
            for row in reliability.tenancy(**reliability.QUICK["tenancy"])}
    run = [row for row in rows.values() if row.held is not None]
    assert len(run) == 10 and all(row.held for row in run), [(r.check, r.attacker_got, r.honest_saw) for r in run]
    for row in run[:-1]:  # the shared-token row starts no stack
        moved = re.match(r"intact, ([\d.]+) MiB in (\d+) transfers; a new session: intact$", row.honest_saw)
        assert moved and int(moved.group(2)) >= 1, (row.check, row.honest_saw)
    assert rows["descriptor exhaustion"].attacker_got == "40 opened, 110 of 150 refused (110: limit per user)"
    assert "the limit is 524288" in rows["unbounded buffering toward a silent target"].attacker_got
    assert "0 offers received" in rows["resource-name claiming by another gateway"].attacker_got
    assert rows["a token in the log"].attacker_got == \
        "HTTP {431: 2}; token echoed in 0 replies, in 0 log records; 0 at ERROR"
    assert rows["hostile JSON"].attacker_got.startswith("{'JSON 4xx': 6} of 6 requests; 2 of 2 huge-integer")
    assert rows["slots that never come back (idle expiry)"].attacker_got.startswith("8 bound, 4 of 4 past the cap of 8 refused 429")
    assert rows["slots that never come back (gateway restart)"].attacker_got.startswith(
        "2 of 2 conversations freed when the gateway came back; the live one told 'closed: ")
    assert rows["the gateway as a UDP prober"].attacker_got.startswith("0 of 40 probing candidates applied")
    assert rows["'applied' after end-of-candidates"].attacker_got == "0 of 8 reported applied"
    assert rows["user token equal to the gateway token"].attacker_got.startswith("refused at start: ")
    assert all(row.attacker_got.startswith("not run here: ") for row in rows.values() if row.held is None)
    table = reliability.tenancy_table(list(rows.values()))
    assert table.count("\n") == len(rows) + 1 and "| NO |" not in table
