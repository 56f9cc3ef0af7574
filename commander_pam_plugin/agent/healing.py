"""Tunnels that heal: when a tunnel's peer is lost, negotiate a new one with backoff and jitter.

The listener stays bound the whole time (state "reconnecting", with the reason), so the
local port never changes and a new TCP connection goes through as soon as the gateway is
back. A refusal that will not change by retrying (resource removed, access revoked, bad
token) ends the tunnel instead: state "lost" with that refusal as its reason.
"""
from __future__ import annotations

import logging
import random
import threading
from typing import Callable

from ..errors import PamError
from ..negotiation import ConnectOptions, RouterRefusal
from ..runtime import PamRuntime
from ..tunnel import Tunnel

log = logging.getLogger(__name__)

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 30.0
# the router's answers that say "not you, not this resource": retrying cannot help
PERMANENT_STATUSES = frozenset({400, 401, 403, 404})


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Exponential backoff with full jitter in its upper half: 0.25-0.5 s, 0.5-1 s, ... up to 30 s."""
    ceiling = min(MAX_DELAY_S, FIRST_DELAY_S * (2 ** attempt))
    return ceiling * (0.5 + rng.random() / 2)


def is_permanent(exc: PamError) -> bool:
    return isinstance(exc, RouterRefusal) and exc.http_status in PERMANENT_STATUSES


class Healer:
    """One thread per reconnecting tunnel; stop() (the user's) wakes it and it gives up."""

    def __init__(self, runtime: PamRuntime, on_change: Callable[[], None]) -> None:
        self.runtime = runtime
        self.on_change = on_change
        self._stopping: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._rng = random.Random()

    def tunnel_lost(self, tunnel: Tunnel) -> None:
        """The tunnel's on_lost callback (on the loop thread): start healing unless already."""
        self.on_change()
        if tunnel.state != "reconnecting":
            return
        with self._lock:
            if tunnel.id in self._stopping:
                return
            stop = self._stopping[tunnel.id] = threading.Event()
        threading.Thread(target=self._heal, args=(tunnel, stop), name=f"pam-heal-{tunnel.id}", daemon=True).start()

    def forget(self, tunnel_id: str) -> None:
        """The user stopped the tunnel: no more attempts."""
        with self._lock:
            stop = self._stopping.pop(tunnel_id, None)
        if stop is not None:
            stop.set()

    def stop_all(self) -> None:
        with self._lock:
            events = list(self._stopping.values())
            self._stopping.clear()
        for event in events:
            event.set()

    def _heal(self, tunnel: Tunnel, stop: threading.Event) -> None:
        self.runtime.release_session(tunnel, notify=False, wait=False)
        attempt = 0
        try:
            while not stop.wait(backoff_delay(attempt, self._rng)):
                attempt += 1
                if tunnel.state != "reconnecting":
                    return
                if stop.is_set() or tunnel.id not in self.runtime.tunnels:
                    return
                try:  # another tunnel to the same gateway may have healed first: then reuse its peer
                    self.runtime.attach_session(None, tunnel, options=ConnectOptions(
                        timeout_s=self.runtime.config.connect_timeout_s, **getattr(tunnel, "access", {})))
                except PamError as exc:
                    if is_permanent(exc):
                        log.info("tunnel %s: not retrying: %s", tunnel.id, exc.message)
                        tunnel.reason = exc.message[:200]
                        self.runtime.loop.run(tunnel.stop(), timeout=5)
                        tunnel.state = "lost"
                        return
                    tunnel.reason = f"reconnecting (attempt {attempt}): {exc.message}"[:200]
                    log.info("tunnel %s: %s", tunnel.id, tunnel.reason)
                    continue
                if stop.is_set() or tunnel.id not in self.runtime.tunnels:
                    self.runtime.release_session(tunnel)
                    return
                tunnel.reason = ""
                log.info("tunnel %s: open again after %d attempt(s)", tunnel.id, attempt)
                return
        finally:
            with self._lock:
                if self._stopping.get(tunnel.id) is stop:
                    del self._stopping[tunnel.id]
            self.on_change()
