"""Quotas of one gateway: the `[gateway.limits]` table, its safe defaults and who uses how much.

One user must never take the gateway down for the others. Descriptors are the scarcest
thing a gateway has, so the connection quotas are sized from the process's own
RLIMIT_NOFILE unless the config says otherwise; every other limit bounds memory or work per
session. Each refusal goes to the one who exceeded it, with the limit in the reason.
"""
from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Any

from ..flow import DEFAULT_WINDOW, MAX_WINDOW, MIN_WINDOW
from ..protocol import FIRST_STREAM_ID, MAX_STREAM_ID

# Descriptors kept for everything that is not a target connection: the router link, HTTP
# clients, ICE sockets of each session, logs, recordings.
DESCRIPTOR_RESERVE = 128


def descriptor_limit() -> int:
    """The soft RLIMIT_NOFILE of this process (what an open() would run into)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def default_connections_per_gateway(nofile: int) -> int:
    """Half of what is left after the reserve: each session also holds UDP sockets and a channel."""
    return max(16, (nofile - DESCRIPTOR_RESERVE) // 2)


@dataclass(frozen=True)
class GatewayLimits:
    stream_window: int = DEFAULT_WINDOW  # credit granted per stream, each direction
    stream_buffer_bytes: int = 4 * 1024 * 1024  # held for one stream before it is cut
    session_buffer_bytes: int = 64 * 1024 * 1024  # held for all streams of a session
    streams_per_session: int = 256
    connections_per_user: int | None = None  # None: a quarter of connections_per_gateway
    connections_per_gateway: int | None = None  # None: sized from RLIMIT_NOFILE at start
    control_messages_per_s: float = 200.0  # per session, with a burst of twice that
    resizes_per_s: float = 20.0  # applied (and recorded) at most this often; the last one always
    max_remote_candidates: int = 32  # remote candidates ICE will check per conversation
    allow_loopback_candidates: bool | None = None  # None: only if every host address is loopback

    def resolved(self, nofile: int | None = None) -> "GatewayLimits":
        """These limits with the descriptor-derived defaults filled in."""
        nofile = descriptor_limit() if nofile is None else nofile
        per_gateway = self.connections_per_gateway or default_connections_per_gateway(nofile)
        per_user = self.connections_per_user or max(8, per_gateway // 4)
        return GatewayLimits(**{**self.__dict__, "connections_per_gateway": per_gateway,
                                "connections_per_user": min(per_user, per_gateway)})


_INTEGERS = {  # key: (low, high)
    "stream_window": (MIN_WINDOW, MAX_WINDOW),
    "stream_buffer_bytes": (MIN_WINDOW, 1 << 32),
    "session_buffer_bytes": (MIN_WINDOW, 1 << 36),
    "streams_per_session": (1, MAX_STREAM_ID - FIRST_STREAM_ID + 1),
    "connections_per_user": (1, 1 << 20),
    "connections_per_gateway": (1, 1 << 20),
    "max_remote_candidates": (1, 256),
}
_RATES = {"control_messages_per_s": (1.0, 100_000.0), "resizes_per_s": (0.1, 1000.0)}


def limits_from_table(reader: Any) -> GatewayLimits:
    """Parse `[gateway.limits]` (reader: config._Reader of that table, or None for defaults)."""
    if reader is None:
        return GatewayLimits()
    reader.reject_unknown(set(_INTEGERS) | set(_RATES) | {"allow_loopback_candidates"})
    values: dict[str, Any] = {}
    for key, (low, high) in _INTEGERS.items():
        value = reader.get(key, int)
        if value is not None:
            if not low <= value <= high:
                raise reader.error(key, f"must be an integer from {low} to {high}")
            values[key] = value
    for key, (low, high) in _RATES.items():
        if key in reader.table:
            values[key] = reader.number(key, 0.0, low, high)
    values["allow_loopback_candidates"] = reader.get("allow_loopback_candidates", bool)
    limits = GatewayLimits(**values)
    if limits.stream_buffer_bytes < limits.stream_window:
        raise reader.error("stream_buffer_bytes", "must be at least stream_window (an honest stream holds that much)")
    if limits.session_buffer_bytes < limits.stream_buffer_bytes:
        raise reader.error("session_buffer_bytes", "must be at least stream_buffer_bytes")
    return limits


class ConnectionQuota:
    """Open target connections, per user and for the whole gateway."""

    def __init__(self, limits: GatewayLimits) -> None:
        self.per_user = limits.connections_per_user or 0
        self.per_gateway = limits.connections_per_gateway or 0
        self.total = 0
        self.by_user: dict[str, int] = {}

    def acquire(self, user: str) -> str | None:
        """Take one slot for `user`, or return the reason there is none."""
        if self.by_user.get(user, 0) >= self.per_user:
            return f"you have {self.per_user} open connections through this gateway, its limit per user"
        if self.total >= self.per_gateway:
            return f"the gateway has {self.per_gateway} open connections, its limit; try again later"
        self.by_user[user] = self.by_user.get(user, 0) + 1
        self.total += 1
        return None

    def release(self, user: str) -> None:
        left = self.by_user.get(user, 0) - 1
        if left > 0:
            self.by_user[user] = left
        else:
            self.by_user.pop(user, None)
        self.total -= 1


class RateBucket:
    """A token bucket: `rate` per second with a burst of `burst`; time from the caller's clock."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False
