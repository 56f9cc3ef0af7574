"""The agent process: a Unix-socket server in front of one PamRuntime that owns the tunnels.

Only the same uid may talk to it: the socket is 0600 in a 0700 directory, and every
connection's peer credentials (SO_PEERCRED) are checked before a byte of it is read.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import socket
import socketserver
import threading
import time
from pathlib import Path
from typing import Any

from .. import plugin
from ..errors import PamError
from ..negotiation import ConnectOptions, valid_name
from ..runtime import PamRuntime, ResourceRef
from . import wire
from .creds import peer_uid
from .healing import Healer

log = logging.getLogger(__name__)

DEFAULT_IDLE_S = 300.0
IDLE_ENV = "PAM_AGENT_IDLE_S"
_agent_ids = itertools.count(1)


def idle_seconds() -> float:
    text = os.environ.get(IDLE_ENV)
    try:
        value = float(text) if text else DEFAULT_IDLE_S
    except ValueError:
        value = DEFAULT_IDLE_S
    return value if value > 0 else DEFAULT_IDLE_S


class Agent:
    """The requests the agent answers, and its idle clock (no live tunnel for idle_s: exit)."""

    def __init__(self, runtime: PamRuntime, idle_s: float) -> None:
        self.runtime = runtime
        self.idle_s = idle_s
        self._changed = threading.Condition()
        self._last_activity = time.monotonic()
        self._busy = 0
        self.exiting = threading.Event()
        self.healer = Healer(runtime, self.touch)

    # --- idle clock -----------------------------------------------------------------------

    def _live_tunnels(self) -> int:
        return sum(1 for t in list(self.runtime.tunnels.values()) if t.state in ("up", "reconnecting"))

    def touch(self, delta: int = 0) -> None:
        with self._changed:
            self._busy += delta
            self._last_activity = time.monotonic()
            self._changed.notify_all()

    def wait_idle(self) -> None:
        """Return when asked to exit, or after idle_s with no request and no live tunnel."""
        with self._changed:
            while not self.exiting.is_set():
                if self._busy or self._live_tunnels():
                    # a tunnel's loss or stop notifies; a request's end touches
                    self._changed.wait()
                    continue
                left = self._last_activity + self.idle_s - time.monotonic()
                if left <= 0:
                    return
                self._changed.wait(left)

    def request_exit(self) -> None:
        self.exiting.set()
        self.touch()

    # --- requests -------------------------------------------------------------------------

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "list":
            return {"ok": True, "tunnels": [t.describe() for t in list(self.runtime.tunnels.values())]}
        if op == "start":
            return self._start(request)
        if op == "stop":
            return self._stop(request)
        if op == "wait":
            return self._wait(request)
        self.request_exit()
        return {"ok": True, "pid": os.getpid()}

    def _start(self, request: dict[str, Any]) -> dict[str, Any]:
        name, gateway = request.get("resource"), request.get("gateway")
        if not isinstance(name, str) or not valid_name(name):
            raise wire.WireError("start needs a valid resource name")
        if gateway is not None and (not isinstance(gateway, str) or not valid_name(gateway)):
            raise wire.WireError("gateway must be a valid gateway name")
        try:
            host = plugin.listen_address(str(request.get("host", "127.0.0.1")))
            port = plugin.port_number(str(request.get("port", 0)))
            timeout = request.get("timeout")
            timeout = plugin.timeout_seconds(str(timeout)) if timeout is not None else None
            reason, ticket = (plugin.access_text(str(request[k])) if request.get(k) is not None else None
                              for k in ("reason", "ticket"))
            wait = plugin.wait_seconds(str(request.get("wait_timeout", 300)))
        except argparse.ArgumentTypeError as exc:
            raise wire.WireError(str(exc)) from None
        trickle = request.get("trickle", True) is not False
        options = ConnectOptions(trickle=trickle, timeout_s=timeout or self.runtime.config.connect_timeout_s,
                                 reason=reason, ticket=ticket, wait_timeout_s=wait)
        ref = ResourceRef(name, gateway) if gateway else self.runtime.resolve(None, name)
        tunnel = self.runtime.start_tunnel(None, ref, host, port, trickle=trickle, options=options,
                                           on_lost=self.healer.tunnel_lost, tunnel_id=f"a{next(_agent_ids)}",
                                           heal=True)
        tunnel.access = {"reason": reason, "ticket": ticket}  # a healed session's offer carries them too
        record = tunnel.describe()
        record["agent_pid"] = os.getpid()
        return {"ok": True, "tunnel": record}

    def _wait(self, request: dict[str, Any]) -> dict[str, Any]:
        """Until tunnel `id` is in `state` (woken by every change, no polling), at most `timeout` s."""
        which, wanted, timeout = request.get("id"), request.get("state"), request.get("timeout", 30)
        if not isinstance(which, str) or not isinstance(wanted, str) or \
                not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 <= timeout <= 600:
            raise wire.WireError("wait needs an id, a state and a timeout of 0-600 s")
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                tunnel = self.runtime.tunnels.get(which)
                if tunnel is None:
                    raise PamError(f"no tunnel {which!r}")
                left = deadline - time.monotonic()
                if tunnel.state == wanted or left <= 0:
                    return {"ok": True, "tunnel": tunnel.describe(), "reached": tunnel.state == wanted}
                self._changed.wait(left)

    def _stop(self, request: dict[str, Any]) -> dict[str, Any]:
        runtime = self.runtime
        if request.get("all") is True:
            self.healer.stop_all()
            stopped = runtime.stop_all()
        else:
            which = request.get("id")
            if not isinstance(which, str) or not which:
                raise wire.WireError("stop needs an id, a resource name or all")
            ids = [which] if which in runtime.tunnels else \
                [t.id for t in list(runtime.tunnels.values()) if t.resource == which]  # a resource name
            for tunnel_id in ids:  # nothing matched is not an error here: the shell may hold it
                self.healer.forget(tunnel_id)
            stopped = [runtime.stop_tunnel(tunnel_id) for tunnel_id in ids]
        return {"ok": True, "stopped": [t.describe() for t in stopped]}


class _Handler(socketserver.BaseRequestHandler):
    server: "AgentSocketServer"

    def handle(self) -> None:
        sock: socket.socket = self.request
        if peer_uid(sock) != os.getuid():
            log.warning("agent: refused a connection from another user")
            sock.sendall(wire.encode(wire.refusal("this agent serves only its own user")))
            return
        agent = self.server.agent
        agent.touch(+1)
        try:
            sock.settimeout(10)
            line = sock.makefile("rb").readline(wire.MAX_LINE + 1)
            sock.settimeout(None)
            try:
                answer = agent.handle(wire.parse_request(line))
            except wire.WireError as exc:
                answer = wire.refusal(str(exc))
            except PamError as exc:
                answer = wire.refusal(exc.message)
            except Exception as exc:  # the agent outlives any one request
                log.exception("agent request failed")
                answer = wire.refusal(f"agent error: {exc.__class__.__name__}")
            sock.sendall(wire.encode(answer))
        except OSError:
            pass
        finally:
            agent.touch(-1)


class AgentSocketServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, agent: Agent) -> None:
        self.agent = agent
        old_umask = os.umask(0o177)  # the socket is created 0600, never briefly wider
        try:
            super().__init__(str(path), _Handler)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)


def serve(path: Path, ready_fd: int | None = None, idle_s: float | None = None) -> None:
    """Run the agent on `path` until idle or told to exit; writes 'ready' to ready_fd when listening."""
    from ..config import load_config

    runtime = PamRuntime(load_config(), reuse_peers=True)
    agent = Agent(runtime, idle_s or idle_seconds())
    if path.exists() or path.is_symlink():
        path.unlink()  # a stale socket: the caller holds the start lock and could not connect
    server = AgentSocketServer(path, agent)
    inode = path.stat().st_ino
    thread = threading.Thread(target=server.serve_forever, name="pam-agent-socket", daemon=True)
    thread.start()
    if ready_fd is not None:
        os.write(ready_fd, f"ready {os.getpid()}\n".encode())
        os.close(ready_fd)
    log.info("agent %d listening on %s", os.getpid(), path)
    try:
        agent.wait_idle()
    finally:
        server.shutdown()
        server.server_close()
        try:
            if path.stat().st_ino == inode:
                path.unlink()
        except OSError:
            pass
        agent.healer.stop_all()
        runtime.shutdown()
