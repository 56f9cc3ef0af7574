"""When rtc.PamConnection's consent loop sends an ICE consent check: rarely for an idle or busy
session, at every tick once our traffic goes unanswered or a check was missed.

A check every 0.5 s cost 200 idle sessions ~15% of a core on each side (a STUN request, its
HMAC and its answer, both ways). Liveness needs far fewer: the loop sleeps until a check can be
due (at most IDLE_CHECK_S) and sends one only when it is:

- a check was missed: confirm at once, every CONFIRM_TICK_S (a dead peer is given up after
  CONSENT_FAILURES misses, as before);
- we sent data and heard nothing back for SUSPECT_AFTER_S: traffic is not being acknowledged;
- data from the peer keeps arriving: every FLOWING_CHECK_S (RFC 7675's 5 s: the data already
  proves the peer is there);
- otherwise (idle): every IDLE_CHECK_S, so an idle session still notices a dead peer within
  1.2 x IDLE_CHECK_S + CONSENT_FAILURES x 0.5 s STUN timeout + 2 x CONFIRM_TICK_S, about 4.2 s,
  inside the 5 s that benchmarks/reliability.py holds it to; a session that starts sending to
  a dead peer is noticed as fast, from its next wake-up on.

"We sent data" is known where sctp_tuning's DTLS transport sends (it stamps the connection); with
PAM_SCTP_TUNING=0 every tick sends a check, as before this module.
"""
from __future__ import annotations

import random
import time
from typing import Any

from . import sctp_tuning

IDLE_CHECK_S = 2.0
FLOWING_CHECK_S = 5.0
SUSPECT_AFTER_S = 1.0
CONFIRM_TICK_S = 0.1
MIN_TICK_S = 0.05


def tick_s(interval: float, failures: int, connection: Any) -> float:
    """How long the consent loop sleeps before it looks again: stock, every `interval`; tuned,
    until the next check can be due (a sleeping loop costs nothing), at most IDLE_CHECK_S.
    Randomised by +-20%, as RFC 7675 asks."""
    jitter = 0.8 + 0.4 * random.random()
    if not _tuned(connection):
        return interval * jitter
    if failures:
        return CONFIRM_TICK_S * jitter
    since_check = time.monotonic() - getattr(connection, "_pam_last_check", 0.0)
    return max(MIN_TICK_S, (IDLE_CHECK_S - since_check) * jitter)


def check_due(connection: Any, failures: int) -> bool:
    """Whether this tick sends a consent check (and if so, it is counted as sent now)."""
    if not _tuned(connection):
        return True
    now = time.monotonic()
    last_heard = max(getattr(connection, "_last_data", 0.0), getattr(connection, "_pam_last_answer", 0.0))
    last_sent = getattr(connection, "_pam_last_sent", 0.0)
    since_check = now - getattr(connection, "_pam_last_check", 0.0)
    if failures or (last_sent > last_heard and now - last_heard >= SUSPECT_AFTER_S):
        due = True
    elif now - getattr(connection, "_last_data", 0.0) < IDLE_CHECK_S:
        due = since_check >= FLOWING_CHECK_S
    else:
        due = since_check >= IDLE_CHECK_S
    if due:
        connection._pam_last_check = now
    return due


def answered(connection: Any) -> None:
    """A consent check was answered: the peer was heard now."""
    connection._pam_last_answer = time.monotonic()


def _tuned(connection: Any) -> bool:
    tuned = getattr(connection, "_pam_idle_consent", None)
    if tuned is None:
        tuned = connection._pam_idle_consent = sctp_tuning.enabled()
    return tuned
