"""Connect-phase checkpoints: structured events for hooks, DEBUG lines for logs, a table for --timing.

Lines go out at DEBUG, never INFO: a Commander-style `debug --file` handler drops INFO records,
which is how Commander's own timing lines got lost. `PAM_CONNECT_TIMING=1` alone is enough to
get them (Commander's needed debug logging on as well).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

LOGGER_NAME = "commander_pam_plugin.timing"
ENV_VAR = "PAM_CONNECT_TIMING"
log = logging.getLogger(LOGGER_NAME)

# Labels and summary phases, named as in Commander so its users recognise them.
LAUNCH_TUNNEL = "pam-launch:webrtc-tunnel"
LAUNCH_SESSION = "pam-launch:cli_session"
LAUNCH_TOTAL = "pam-launch:total"
LAUNCH_READY = "ready_for_prompt"
TUNNEL_TUNNEL = "pam-tunnel:webrtc-tunnel"
TUNNEL_TOTAL = "pam-tunnel:total"
TUNNEL_READY = "ready"


@dataclass(frozen=True)
class TimingEvent:
    """One checkpoint (step since this label's previous event) or a summary (total only)."""

    label: str
    phase: str
    step_ms: float
    total_ms: float
    summary: bool = False


@dataclass
class _Timeline:
    """What a ConnectTiming and its children share: start time, lock and event list."""

    t0: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    events: list[TimingEvent] = field(default_factory=list)


class ConnectTiming:
    """Records checkpoints for one label; children share the start, so totals line up."""

    def __init__(self, label: str, hook: Any = None,
                 clock: Callable[[], float] = time.perf_counter,
                 _timeline: _Timeline | None = None) -> None:
        self.label = label
        self._hook = hook
        self._clock = clock
        self._timeline = _timeline or _Timeline(t0=clock())
        self._last = self._timeline.t0

    @property
    def events(self) -> list[TimingEvent]:
        """Every event of this timing and its relatives (parent, children), in record order."""
        with self._timeline.lock:
            return list(self._timeline.events)

    def child(self, label: str) -> ConnectTiming:
        """A timing for another label on the same timeline (same t0, same events, same hook)."""
        return ConnectTiming(label, self._hook, self._clock, self._timeline)

    def checkpoint(self, phase: str) -> TimingEvent:
        """Record that `phase` just finished; safe to call from any thread."""
        return self._record(phase, summary=False)

    def summary(self, phase: str) -> TimingEvent:
        """Record the end of the whole path (e.g. ready_for_prompt) as a total-only line."""
        return self._record(phase, summary=True)

    def _record(self, phase: str, summary: bool) -> TimingEvent:
        with self._timeline.lock:
            now = self._clock()
            event = TimingEvent(self.label, phase, step_ms=(now - self._last) * 1000.0,
                                total_ms=(now - self._timeline.t0) * 1000.0, summary=summary)
            self._last = now
            self._timeline.events.append(event)
        # Outside the lock: a hook may be slow or may record timing itself.
        if self._hook is not None:
            self._hook.pam_connect_timing(event=event)
        return event


def env_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """True when PAM_CONNECT_TIMING asks for timing lines (1, true, yes, on)."""
    return environ.get(ENV_VAR, "").strip().lower() in {"1", "true", "yes", "on"}


def timing_enabled(logger: logging.Logger = log, environ: Mapping[str, str] = os.environ) -> bool:
    """Timing lines are wanted: PAM_CONNECT_TIMING=1, or DEBUG is on for the timing logger."""
    return env_enabled(environ) or logger.isEnabledFor(logging.DEBUG)


def log_event(event: TimingEvent, logger: logging.Logger = log,
              environ: Mapping[str, str] = os.environ) -> None:
    """Log one timing line at DEBUG when timing is enabled (the default pam_connect_timing sink)."""
    if not timing_enabled(logger, environ):
        return
    if not logger.isEnabledFor(logging.DEBUG):
        # The env switch alone must be enough: let this logger pass DEBUG. Handlers still
        # decide where it lands (a DEBUG file handler: yes; an INFO console: no).
        logger.setLevel(logging.DEBUG)
    logger.debug("%s", format_line(event))


def format_line(event: TimingEvent) -> str:
    """`label | phase | +12.3 ms (step) | 45.6 ms (total)`, or `label | phase | 45.6 ms`."""
    if event.summary:
        return f"{event.label} | {event.phase} | {event.total_ms:.1f} ms"
    return f"{event.label} | {event.phase} | +{event.step_ms:.1f} ms (step) | {event.total_ms:.1f} ms (total)"


def format_table(events: Iterable[TimingEvent]) -> str:
    """The phase table `--timing` prints: label, phase, step and total ms in aligned columns."""
    rows = [("label", "phase", "step ms", "total ms")]
    for e in events:
        rows.append((e.label, e.phase, "" if e.summary else f"{e.step_ms:.1f}", f"{e.total_ms:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}"
             for r in rows]
    return "\n".join(line.rstrip() for line in lines)
