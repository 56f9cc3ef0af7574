"""Connect timing: the recorder, the formats, and where lines land through the real shell's logging."""
from __future__ import annotations

import io
import itertools
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pluggy
import pytest

from commander_pam_plugin import hookspecs, timing
from commander_pam_plugin.timing import ConnectTiming, TimingEvent

FIXTURE = str(Path(__file__).parent / "plugins" / "fixture_commands.py")
SHELL = str(Path(sys.executable).with_name("commander-shell"))
TIMING_MARK = "pam-launch:"


class FakeClock:
    """A clock that advances `tick` seconds per read; thread-safe like perf_counter."""

    def __init__(self, tick: float = 0.001) -> None:
        self._count = itertools.count()
        self._tick = tick

    def __call__(self) -> float:
        return next(self._count) * self._tick


class Recorder:
    """A pam_connect_timing plugin that keeps what it is given."""

    def __init__(self) -> None:
        self.events: list[TimingEvent] = []

    @hookspecs.hookimpl
    def pam_connect_timing(self, event: TimingEvent) -> None:
        self.events.append(event)


def test_checkpoints_children_and_summary_share_one_timeline():
    pm = pluggy.PluginManager("commander")
    pm.add_hookspecs(hookspecs)
    recorder = Recorder()
    pm.register(recorder)
    total = ConnectTiming(timing.LAUNCH_TOTAL, hook=pm.hook, clock=FakeClock())  # t0 = 0 ms
    tunnel = total.child(timing.LAUNCH_TUNNEL)
    first = tunnel.checkpoint("offer_sent")  # 1 ms
    second = tunnel.checkpoint("answer_applied")  # 2 ms
    ready = total.summary(timing.LAUNCH_READY)  # 3 ms
    assert first == TimingEvent(timing.LAUNCH_TUNNEL, "offer_sent", 1.0, 1.0, False)
    assert (second.step_ms, second.total_ms) == (1.0, 2.0)
    assert ready == TimingEvent(timing.LAUNCH_TOTAL, timing.LAUNCH_READY, 3.0, 3.0, True)
    assert total.events == tunnel.events == [first, second, ready] == recorder.events


def test_checkpoints_from_many_threads_keep_a_consistent_timeline():
    total = ConnectTiming("t:total", clock=FakeClock(tick=0.000001))
    children = [total.child(f"t:{i}") for i in range(8)]
    start = threading.Barrier(len(children))

    def work(child: ConnectTiming) -> None:
        start.wait()
        for n in range(300):
            child.checkpoint(f"p{n}")

    threads = [threading.Thread(target=work, args=(c,)) for c in children]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
        assert not t.is_alive(), "a checkpointing thread hung"
    events = total.events
    assert len(events) == 8 * 300
    totals = [e.total_ms for e in events]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    for child in children:
        mine = [e for e in events if e.label == child.label]
        assert sum(e.step_ms for e in mine) == pytest.approx(mine[-1].total_ms)


def test_format_line_matches_commanders():
    step = TimingEvent("pam-launch:webrtc-tunnel", "offer_sent", 12.34, 45.67)
    ready = TimingEvent("pam-launch:total", "ready_for_prompt", 45.67, 45.67, summary=True)
    assert timing.format_line(step) == "pam-launch:webrtc-tunnel | offer_sent | +12.3 ms (step) | 45.7 ms (total)"
    assert timing.format_line(ready) == "pam-launch:total | ready_for_prompt | 45.7 ms"


def test_format_table_aligns_columns():
    table = timing.format_table([
        TimingEvent("pam-tunnel:webrtc-tunnel", "offer_sent", 3.25, 3.25),
        TimingEvent("pam-tunnel:webrtc-tunnel", "data_channel_open", 1234.5, 1237.75),
        TimingEvent("pam-tunnel:total", "ready", 1238.0, 1238.0, summary=True),
    ])
    assert table.splitlines() == [
        "label                     phase              step ms  total ms",
        "pam-tunnel:webrtc-tunnel  offer_sent             3.2       3.2",
        "pam-tunnel:webrtc-tunnel  data_channel_open   1234.5    1237.8",
        "pam-tunnel:total          ready                         1238.0",
    ]


@pytest.fixture
def quiet_logger():
    """A timing logger of our own, below a root that is not at DEBUG, with a DEBUG handler."""
    logger = logging.getLogger("test_timing.quiet")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    logger.propagate = False
    saved_root = logging.getLogger().level
    logging.getLogger().setLevel(logging.WARNING)
    yield logger, stream
    logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
    logging.getLogger().setLevel(saved_root)


def test_env_switch_alone_is_enough_even_when_nothing_is_at_debug(quiet_logger):
    logger, stream = quiet_logger
    event = TimingEvent("pam-launch:total", "ready_for_prompt", 1.0, 1.0, summary=True)
    assert not timing.timing_enabled(logger, environ={})
    timing.log_event(event, logger, environ={})
    assert stream.getvalue() == ""
    assert timing.timing_enabled(logger, environ={"PAM_CONNECT_TIMING": "1"})
    timing.log_event(event, logger, environ={"PAM_CONNECT_TIMING": "1"})
    assert stream.getvalue() == "pam-launch:total | ready_for_prompt | 1.0 ms\n"


def test_debug_on_the_logger_enables_timing(quiet_logger):
    logger, _ = quiet_logger
    logger.setLevel(logging.DEBUG)
    assert timing.timing_enabled(logger, environ={"PAM_CONNECT_TIMING": "0"})


def shell(tmp_path: Path, *lines: str, env_timing: bool) -> tuple[subprocess.CompletedProcess, str]:
    """Run the real shell with the fixture plugin; returns the process and the debug file's text."""
    env = {k: v for k, v in os.environ.items() if k != "PAM_CONNECT_TIMING"}
    if env_timing:
        env["PAM_CONNECT_TIMING"] = "1"
    argv = [SHELL, "--plugin", FIXTURE]
    for line in lines:
        argv += ["-c", line.replace("FILE", str(tmp_path / "debug.log"))]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    log_file = tmp_path / "debug.log"
    return done, log_file.read_text() if log_file.exists() else ""


def test_debug_file_with_env_gets_timing_lines_and_no_info_lines(tmp_path):
    done, file_text = shell(tmp_path, "debug --file=FILE", "demo connect web-1", env_timing=True)
    lines = [line for line in file_text.splitlines() if TIMING_MARK in line]
    prefix = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} - DEBUG - commander_pam_plugin\.timing - "
    step = r" \| \+\d+\.\d ms \(step\) \| \d+\.\d ms \(total\)"
    patterns = [prefix + r"pam-launch:webrtc-tunnel \| offer_sent" + step,
                prefix + r"pam-launch:webrtc-tunnel \| data_channel_open" + step,
                prefix + r"pam-launch:total \| ready_for_prompt \| \d+\.\d ms"]
    assert len(lines) == 3
    for line, pattern in zip(lines, patterns):
        assert re.fullmatch(pattern, line), line
    assert " - INFO - " not in file_text and "demo connected" not in file_text
    # The console stays at INFO: the user's INFO line shows, the timing lines do not.
    assert "demo connected to web-1" in done.stderr
    assert TIMING_MARK not in done.stdout + done.stderr


def test_no_env_and_no_debug_means_no_timing_line_anywhere(tmp_path):
    done, file_text = shell(tmp_path, "demo connect web-1", env_timing=False)
    assert file_text == ""
    assert "demo connected to web-1" in done.stderr
    assert TIMING_MARK not in done.stdout + done.stderr


def test_env_alone_prints_nothing_on_an_info_console(tmp_path):
    done, _ = shell(tmp_path, "demo connect web-1", env_timing=True)
    assert TIMING_MARK not in done.stdout + done.stderr


def test_debug_logging_alone_enables_timing_lines(tmp_path):
    _, file_text = shell(tmp_path, "debug --file=FILE", "demo connect web-1", env_timing=False)
    assert file_text.count(TIMING_MARK) == 3
    done, _ = shell(tmp_path, "debug", "demo connect web-1", env_timing=False)
    assert done.stderr.count(f"DEBUG {timing.LOGGER_NAME}: {TIMING_MARK}") == 3


def test_timing_option_prints_the_phase_table(tmp_path):
    done, _ = shell(tmp_path, "demo connect web-1 --timing", env_timing=False)
    table = done.stdout.splitlines()
    assert table[0].split() == ["label", "phase", "step", "ms", "total", "ms"]
    assert [row.split()[:2] for row in table[1:]] == [
        ["pam-launch:webrtc-tunnel", "offer_sent"],
        ["pam-launch:webrtc-tunnel", "data_channel_open"],
        ["pam-launch:total", "ready_for_prompt"],
    ]
