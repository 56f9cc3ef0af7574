"""When rtc.PamConnection's consent loop sends an ICE consent check: rarely for an idle or busy
session, at every tick once our traffic goes unanswered or a check was missed; and, by default,
from one side only.

A check every 0.5 s cost 200 idle sessions ~15% of a core on each side (a STUN request, its
HMAC and its answer, both ways). Liveness needs far fewer: the loop sleeps until a check can be
due (at most IDLE_CHECK_S) and sends one only when it is:

- a check was missed: confirm at once, every CONFIRM_TICK_S (a dead peer is given up after
  CONSENT_FAILURES misses, as before);
- we sent data and heard nothing back for SUSPECT_AFTER_S: traffic is not being acknowledged;
- data from the peer keeps arriving: every FLOWING_CHECK_S (RFC 7675's 5 s: the data already
  proves the peer is there);
- otherwise (idle): every IDLE_CHECK_S, so an idle session still notices a dead peer within
  1.2 x IDLE_CHECK_S + CLOCK_TICK_S + CONSENT_FAILURES x 0.5 s STUN timeout + 2 x
  CONFIRM_TICK_S, about 4.4 s, inside the 5 s that benchmarks/reliability holds it to; a
  session that starts sending to a dead peer is noticed as fast, from its next wake-up on.

Waits of CLOCK_TICK_S or more end on a tick shared by every consent loop of the event loop
(PAM_CONSENT_CLOCK=0: each on its own timer, as before), so 200 sessions wake the loop a few
times a second instead of ~100 times, and their checks and answers travel in bursts.

One-sided (PAM_CONSENT_MODE, default "one-sided"): with both sides checking every 2 s each side
sent a request, answered one and read two replies per interval. The ICE-controlled side (the
gateway: the client always offers, and the offerer controls) now sends no check of its own
while the controlling side's authenticated checks (or the peer's data) keep arriving: an
answered check proves to the prober that the peer is there, and its arrival proves the same to
the listener. Heard nothing for PASSIVE_QUIET_S (two of the prober's intervals), the listener
checks by itself as above, so a dead client is still freed within PASSIVE_QUIET_S + about
1.7 s (the gateway's bound is 10 s), and a peer that never checks (another ICE agent) just gets
one check every PASSIVE_QUIET_S. "both" restores the two-sided behaviour (benchmarks compare
the two). The listener role needs rtc.PamConnection to count incoming checks, which it does
only on the aioice it was written for (`counts_peer_checks`); elsewhere both sides check.

"We sent data" is known where sctp_tuning's DTLS transport sends (it stamps the connection); with
PAM_SCTP_TUNING=0 every tick sends a check, as before this module.
"""
from __future__ import annotations

import asyncio
import math
import os
import random
import time
import weakref
from typing import Any

from . import sctp_tuning

IDLE_CHECK_S = 2.0
FLOWING_CHECK_S = 5.0
SUSPECT_AFTER_S = 1.0
CONFIRM_TICK_S = 0.1
MIN_TICK_S = 0.05
PASSIVE_QUIET_S = 5.0  # > 2 x 1.2 x IDLE_CHECK_S: two of the prober's checks in a row missing
CLOCK_TICK_S = 0.25  # waits of at least this long end on a shared tick of the loop (see wait())
MODE_ENV = "PAM_CONSENT_MODE"
MODES = ("one-sided", "both")
CLOCK_ENV = "PAM_CONSENT_CLOCK"  # "0": each consent loop sleeps on its own timer, as before


def mode() -> str:
    """PAM_CONSENT_MODE: "one-sided" (default) or "both" (each side checks, as before)."""
    value = os.environ.get(MODE_ENV, "").strip().lower() or "one-sided"
    return value if value in MODES else "one-sided"


class _Clock:
    """One timer per CLOCK_TICK_S slot of one loop for every consent loop waiting on that slot.

    200 idle sessions, each sleeping on its own timer, woke the loop ~100 times a second, and each
    wake-up on its own costs more than the check it leads to; woken together, their checks go
    out, and their answers come back, in one burst the loop handles in a few passes."""

    def __init__(self) -> None:  # holds no reference to its loop: _clocks is keyed by it, weakly
        self._slots: dict[int, list[asyncio.Future[None]]] = {}

    def wait_until(self, loop: asyncio.AbstractEventLoop, when: float) -> asyncio.Future[None]:
        """A future resolved at the first tick at or after loop time `when`."""
        slot = math.ceil(when / CLOCK_TICK_S)
        future: asyncio.Future[None] = loop.create_future()
        waiters = self._slots.get(slot)
        if waiters is None:
            waiters = self._slots[slot] = []
            loop.call_at(slot * CLOCK_TICK_S, self._fire, slot)
        waiters.append(future)
        return future

    def _fire(self, slot: int) -> None:
        for future in self._slots.pop(slot, ()):
            if not future.done():  # a cancelled waiter (its session closed) is skipped
                future.set_result(None)


_clocks: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Clock]" = weakref.WeakKeyDictionary()


async def wait(delay: float, connection: Any) -> None:
    """The consent loop's sleep: stock, asyncio.sleep(delay); tuned, a wait of CLOCK_TICK_S or more
    ends on the loop's shared tick (up to CLOCK_TICK_S late), shorter ones (confirming a miss)
    stay exact."""
    if not _tuned(connection) or delay < CLOCK_TICK_S or not getattr(connection, "_pam_consent_clock", True):
        await asyncio.sleep(delay)
        return
    loop = asyncio.get_running_loop()
    clock = _clocks.get(loop)
    if clock is None:
        clock = _clocks[loop] = _Clock()
    await clock.wait_until(loop, loop.time() + delay)


def latch(connection: Any) -> None:
    """Fix this connection's settings when it is built (a process may change the environment later)."""
    connection._pam_idle_consent = sctp_tuning.enabled()
    connection._pam_consent_mode = mode()
    connection._pam_consent_clock = os.environ.get(CLOCK_ENV, "").strip() != "0"


def tick_s(interval: float, failures: int, connection: Any) -> float:
    """How long the consent loop sleeps before it looks again: stock, every `interval`; tuned,
    until the next check can be due (a sleeping loop costs nothing), at most IDLE_CHECK_S.
    Randomised by +-20%, as RFC 7675 asks."""
    jitter = 0.8 + 0.4 * random.random()
    if not _tuned(connection):
        return interval * jitter
    if failures:
        return CONFIRM_TICK_S * jitter
    if listening(connection):  # no check to send while the prober's arrive: wake when they would be missed
        quiet_left = PASSIVE_QUIET_S - (time.monotonic() - _last_heard(connection))
        return max(MIN_TICK_S, min(IDLE_CHECK_S, quiet_left))
    since_check = time.monotonic() - getattr(connection, "_pam_last_check", 0.0)
    return max(MIN_TICK_S, (IDLE_CHECK_S - since_check) * jitter)


def check_due(connection: Any, failures: int) -> bool:
    """Whether this tick sends a consent check (and if so, it is counted as sent now)."""
    if not _tuned(connection):
        return True
    now = time.monotonic()
    last_heard = _last_heard(connection)
    last_sent = getattr(connection, "_pam_last_sent", 0.0)
    since_check = now - getattr(connection, "_pam_last_check", 0.0)
    if failures or (last_sent > last_heard and now - last_heard >= SUSPECT_AFTER_S):
        due = True
    elif listening(connection):
        due = now - last_heard >= PASSIVE_QUIET_S
    elif now - getattr(connection, "_last_data", 0.0) < IDLE_CHECK_S:
        due = since_check >= FLOWING_CHECK_S
    else:
        due = since_check >= IDLE_CHECK_S
    if due:
        connection._pam_last_check = now
    return due


def listening(connection: Any) -> bool:
    """True for the side that leaves the checks to its peer: the ICE-controlled one, one-sided mode,
    where incoming checks are counted."""
    return (not getattr(connection, "ice_controlling", True) and getattr(connection, "counts_peer_checks", False)
            and (getattr(connection, "_pam_consent_mode", None) or mode()) == "one-sided")


def answered(connection: Any) -> None:
    """A consent check was answered: the peer was heard now."""
    connection._pam_last_answer = time.monotonic()


def peer_checked(connection: Any) -> None:
    """An authenticated check from the peer arrived: it is there (the listener's proof)."""
    connection._pam_last_peer_check = time.monotonic()


def _last_heard(connection: Any) -> float:
    return max(getattr(connection, "_last_data", 0.0), getattr(connection, "_pam_last_answer", 0.0),
               getattr(connection, "_pam_last_peer_check", 0.0))


def _tuned(connection: Any) -> bool:
    tuned = getattr(connection, "_pam_idle_consent", None)
    if tuned is None:
        tuned = connection._pam_idle_consent = sctp_tuning.enabled()
    return tuned
