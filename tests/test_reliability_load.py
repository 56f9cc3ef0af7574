"""Load and leaks: many sessions at once, many open/close cycles (full sizes in benchmarks/reliability/)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import reliability  # noqa: E402


def test_concurrent_sessions_all_move_their_bytes_intact_and_idle_ones_stay_up(tmp_path):
    sessions, size = reliability.QUICK["sessions"]
    row = reliability.concurrent_sessions(sessions, size, tmp_path, idle=3)
    assert row.lost == 0, row.failures
    assert row.figures["peak"]["live"] == len(row.figures["ready_s"]) == sessions + 3


def test_open_close_cycles_leave_no_fd_thread_or_session_behind(tmp_path):
    row = reliability.open_close_cycles(reliability.QUICK["cycles"], tmp_path, warmup=5)
    assert row.lost == 0, row.failures
    before, after = row.figures["client_fds"]
    assert after <= before  # (the row checks no new fd appeared; an older test's may have closed meanwhile)
    assert row.figures["client_threads"][0] >= row.figures["client_threads"][1]
