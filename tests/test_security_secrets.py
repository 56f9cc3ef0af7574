"""No password, private key or token in any log record, recording, reply, stream frame or error."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import reliability  # noqa: E402


def test_a_full_recorded_session_and_its_failures_leave_no_secret_anywhere(tmp_path):
    row = reliability.secrets_scan(tmp_path)
    assert row.lost == 0, row.failures
    scanned = row.figures["bytes_scanned"]
    assert all(scanned[source] > 0 for source in scanned), scanned  # every source was really captured
    assert {"ssh password", "private key", "gateway token", "alice's token"} <= set(row.figures["secrets"])


def test_the_grep_finds_a_planted_secret():
    sources = {"log records": ["connecting with hunter2-hunter2", "fine"], "recordings": ["nothing"]}
    assert reliability.find_secrets(sources, {"ssh password": "hunter2-hunter2", "token": "abc-not-there"}) == \
        ["ssh password appears in log records"]
