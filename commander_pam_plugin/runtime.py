"""The plugin's long-lived state in one host process: loop, router sessions, tunnels.

Created on the first pam command and closed by the host's commander_shutdown hook, so
every peer, listener and thread the plugin started ends with the shell.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

from . import protocol
from .config import PamConfig, load_config
from .errors import PamError
from .loop import BackgroundLoop
from .negotiation import ConnectOptions, RouterClient, Session, lookup_resource, open_session, valid_name
from .tunnel import Tunnel

log = logging.getLogger(__name__)

# A list fetched this long ago still names a resource's gateway and kind.
RESOURCE_CACHE_S = 60.0
# Peer reuse (a second tunnel to a gateway rides the live peer: no signaling): "0" turns it off.
REUSE_ENV = "PAM_REUSE_PEERS"
PREFETCH_JOIN_S = 2.0  # the resource list fetched alongside a first connect, for later reuse


def reuse_from_env(default: bool) -> bool:
    value = os.environ.get(REUSE_ENV, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    return default


@dataclass
class SharedSession:
    """A tunnel-mode session and the tunnels riding it; closed when the last one leaves."""

    session: Session
    tunnels: set[str]

    def live(self) -> bool:
        return not self.session._closed and not self.session.peer.lost.is_set()


@dataclass
class ResourceRef:
    """A resource and, when already known, its gateway and kind. Gateway None: the offer is
    addressed to the resource and the router picks the gateway (its reply names it)."""

    name: str
    gateway: str | None = None
    kind: str | None = None


class PamRuntime:
    """Owns the background loop, one RouterClient per router, and the tunnel registry."""

    def __init__(self, config: PamConfig, reuse_peers: bool = False) -> None:
        self.config = config
        self.reuse_peers = reuse_from_env(reuse_peers)
        self._shared: list[SharedSession] = []
        self.loop = BackgroundLoop()
        self.tunnels: dict[str, Tunnel] = {}
        self._router: RouterClient | None = None
        self._embedded: Any = None
        self._lock = threading.Lock()

    # --- router and resources ------------------------------------------------------------

    def router(self) -> RouterClient:
        """The configured router, or the embedded local default when none is configured."""
        with self._lock:
            if self._router is None:
                url, token = self.config.router_url, self.config.token
                if not url:
                    url, token = self._start_embedded()
                if not token:
                    raise PamError("no token configured for the router: set PAM_TOKEN or 'token' in the config file")
                self._router = RouterClient(url, token, ca_file=self.config.ca_file,
                                            insecure_http=self.config.insecure_http)
            return self._router

    def _start_embedded(self) -> tuple[str, str]:
        from .embedded_default import start_embedded_default

        self._embedded = start_embedded_default()
        return self._embedded.router_url, self._embedded.token

    def resolve(self, hook: Any, name: str) -> ResourceRef:
        """A host's vault (pam_resolve_resource) first, else a recent list; never a fetch just to
        connect (an unknown resource is reported by the connect, with the names this user may use)."""
        if not valid_name(name):
            raise PamError(f"{name!r} is not a resource name (letters, digits, '.', '_' or '-', at most 64)",
                           status=2)
        record = hook.pam_resolve_resource(name=name) if hook is not None else None
        if isinstance(record, dict) and record.get("gateway"):
            return ResourceRef(str(record.get("name") or name), str(record["gateway"]), str(record.get("kind", "tcp")))
        # while a reusable peer is live, the list learnt alongside it still names the gateways
        # (each stream on a reused peer is authorized by the gateway anyway)
        max_age = float("inf") if self.reuse_peers and self._live_shared() else RESOURCE_CACHE_S
        entry = lookup_resource(self.router().cached_resources(max_age) or [], name)
        if entry is not None:
            return ResourceRef(name, str(entry.get("gateway")), str(entry.get("kind")))
        return ResourceRef(name)

    def host_addresses(self, hook: Any) -> tuple[str, ...]:
        from .rtc import check_host_addresses

        addresses = list(self.config.host_addresses)
        if hook is not None:
            chosen = hook.pam_ice_host_addresses(addresses=addresses)
            if chosen is not None:
                try:
                    return check_host_addresses(chosen, allow_empty=self.config.ice_transport_policy == "relay")
                except ValueError as exc:
                    raise PamError(f"pam_ice_host_addresses hook: {exc}") from None
        return tuple(addresses)

    def ice_servers(self) -> list[Any]:
        from .rtc import ice_servers_from_config

        try:
            return ice_servers_from_config(self.config.ice_servers)
        except ValueError as exc:
            raise PamError(str(exc)) from None

    # --- sessions --------------------------------------------------------------------------

    def connect(self, hook: Any, ref: ResourceRef, session: protocol.SessionRequest, *, trickle: bool,
                timing: Any = None, options: ConnectOptions | None = None,
                on_peer: Callable[[Any], None] | None = None) -> Session:
        options = options or ConnectOptions(trickle=trickle, timeout_s=self.config.connect_timeout_s)
        return open_session(self.loop, self.router(), ref.gateway, ref.name, session,
                            ice_servers=self.ice_servers(), host_addresses=self.host_addresses(hook),
                            timing=timing, options=options, on_peer=on_peer,
                            ice_transport_policy=self.config.ice_transport_policy)

    def start_tunnel(self, hook: Any, ref: ResourceRef, host: str, port: int, *, trickle: bool,
                     timing: Any = None, on_lost: Callable[[Tunnel], None] | None = None,
                     options: ConnectOptions | None = None, tunnel_id: str | None = None,
                     heal: bool = False) -> Tunnel:
        """Bind the local port, negotiate, and serve; returns once the data plane is up."""
        tunnel = Tunnel(ref.name, ref.gateway or "", host, port, on_lost=on_lost, heal=heal,
                        addressed_gateway=ref.gateway or "")
        if tunnel_id is not None:  # the agent's ids ("a1") never collide with a shell's own ("t1")
            tunnel.id = tunnel_id
        try:
            self.loop.run(tunnel.bind(), timeout=10)
        except OSError as exc:
            # asyncio's own text repeats the address ("error while attempting to bind on address
            # ('127.0.0.1', 8000): address already in use"): say it once, with the system's words.
            reason = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
            raise PamError(f"cannot listen on {host}:{port}: {reason}") from None
        if timing is not None:
            timing.checkpoint("local_listener_bound")
        try:
            self.attach_session(hook, tunnel, trickle=trickle, timing=timing, options=options)
        except BaseException:
            self.loop.run(tunnel.stop(), timeout=5)
            raise
        with self._lock:
            self.tunnels[tunnel.id] = tunnel
        return tunnel

    # --- peer reuse -------------------------------------------------------------------------

    def _live_shared(self, gateway: str | None = None) -> SharedSession | None:
        with self._lock:
            self._shared = [s for s in self._shared if s.live() or s.tunnels]
            for shared in self._shared:
                if shared.live() and (gateway is None or shared.session.gateway == gateway):
                    return shared
        return None

    def attach_session(self, hook: Any, tunnel: Tunnel, *, trickle: bool = True, timing: Any = None,
                       options: ConnectOptions | None = None) -> bool:
        """Give `tunnel` a session: a live one to its gateway (reuse: no signaling at all) or a new
        one. Returns True if it reused one. The gateway checks every stream of a reused peer
        against the tunnel's resource, as it checks an offer."""
        shared = self._live_shared(tunnel.gateway) if self.reuse_peers and tunnel.gateway else None
        reused = shared is not None
        if shared is None:
            prefetch = self._prefetch_resources() if self.reuse_peers else None
            session = self.connect(hook, ResourceRef(tunnel.resource, tunnel.addressed_gateway or None),
                                   protocol.SessionRequest(mode="tunnel"), trickle=trickle,
                                   timing=timing, options=options)
            if prefetch is not None:
                prefetch.join(PREFETCH_JOIN_S)
            shared = SharedSession(session, set())
            with self._lock:
                self._shared.append(shared)
        session = shared.session
        tunnel.gateway = session.gateway or ""  # learnt from the offer's reply if it was not known
        tunnel.stream_resource = tunnel.resource if tunnel.resource != session.resource else None
        with self._lock:
            shared.tunnels.add(tunnel.id)
        self.loop.run(tunnel.attach(session), timeout=5)
        return reused

    def _prefetch_resources(self) -> threading.Thread | None:
        """Fetch the resource list alongside a connect, so that a later tunnel to another resource
        of the same gateway knows its gateway without a request. Off the critical path."""
        router = self.router()
        if router.cached_resources(RESOURCE_CACHE_S) is not None:
            return None

        def fetch() -> None:
            try:
                router.resources()
            except PamError as exc:
                log.debug("resource list prefetch: %s", exc.message)

        thread = threading.Thread(target=fetch, name="pam-resources-prefetch", daemon=True)
        thread.start()
        return thread

    def release_session(self, tunnel: Tunnel, notify: bool = True, wait: bool = True) -> None:
        """The tunnel leaves its session; the last one to leave closes it."""
        session = tunnel.session
        if session is None:
            return
        with self._lock:
            shared = next((s for s in self._shared if s.session is session), None)
            if shared is not None:
                shared.tunnels.discard(tunnel.id)
                if shared.tunnels:
                    return
                self._shared.remove(shared)
        session.close(notify=notify, wait=wait)

    def stop_tunnel(self, tunnel_id: str) -> Tunnel:
        with self._lock:
            tunnel = self.tunnels.pop(tunnel_id, None)
        if tunnel is None:
            known = ", ".join(sorted(self.tunnels)) or "none"
            raise PamError(f"no tunnel {tunnel_id!r}; open tunnels: {known}")
        self._close_tunnel(tunnel)
        return tunnel

    def _close_tunnel(self, tunnel: Tunnel) -> None:
        try:
            self.loop.run(tunnel.stop(), timeout=5)
        except Exception as exc:
            log.debug("stopping tunnel %s: %s", tunnel.id, exc)
        self.release_session(tunnel, notify=tunnel.state not in ("lost", "reconnecting"))

    def stop_all(self) -> list[Tunnel]:
        with self._lock:
            tunnels = list(self.tunnels.values())
            self.tunnels.clear()
        for tunnel in tunnels:
            self._close_tunnel(tunnel)
        return tunnels

    def shutdown(self) -> None:
        """Close every tunnel, the router session, the embedded gateway and the loop thread."""
        self.stop_all()
        with self._lock:
            router, self._router = self._router, None
            embedded, self._embedded = self._embedded, None
        if router is not None:
            router.close()
        self.loop.stop()
        if embedded is not None:
            embedded.stop()


_runtime: PamRuntime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> PamRuntime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = PamRuntime(load_config())
        return _runtime


def shutdown_runtime() -> None:
    global _runtime
    with _runtime_lock:
        runtime, _runtime = _runtime, None
    if runtime is not None:
        runtime.shutdown()
