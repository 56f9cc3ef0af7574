"""Load and leaks: concurrent sessions, open/close cycles."""
from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from client_support import echo_roundtrip, open_fds, payload, sha256
from commander_pam_plugin.errors import PamError
from commander_pam_plugin.runtime import ResourceRef
from gateway_support import EchoServer, free_port, make_config
from . import ROOT
from .stack import Proc, RSS_BOUND_MB, Row, WAIT, echo_resource, runtime, serve, token, wait_until


def echo_load(ports: list[int], size: int) -> list[bool]:
    """One echo round trip of `size` seeded bytes through each port at once; True where intact.

    Runs in its own process (`--echo-load`): a tunnel's user is another process, and load
    threads inside the client's process would starve the plugin's loop of the GIL.
    """
    def one(index_port: tuple[int, int]) -> bool:
        index, port = index_port
        data = payload(size, index)
        try:
            return sha256(echo_roundtrip(port, data)) == sha256(data)
        except OSError:
            return False

    with ThreadPoolExecutor(len(ports)) as pool:
        return list(pool.map(one, enumerate(ports)))


def concurrent_sessions(sessions: int, size: int, folder: Path, idle: int = 5) -> Row:
    """N tunnels up at once against one gateway process, each moving `size` bytes both ways,
    while `idle` more sit quiet (a busy gateway must not drop them either).

    Three processes besides the gateway's: this one holds the tunnels (the plugin's runtime),
    benchmarks/tcp_target.py is the echo target, and an --echo-load child is the tunnels' user.
    """
    row = Row("load: concurrent sessions", "", sessions, "")
    target = Proc([sys.executable, str(ROOT / "benchmarks" / "tcp_target.py")], stdin=True)
    try:
        echo_port = json.loads(target.wait_for(r"^\{")[1].string)["echo"]
        # One user opens every session here, so the per-token budget is raised for this check.
        config = make_config([{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo_port}],
                             router={"rate_limit": 1000, "rate_burst": 1000})
        port = free_port()
        gateway = serve(config, folder, port)
        client = runtime(f"http://127.0.0.1:{port}", token(config, "alice"))
        ref = ResourceRef("echo", config["gateway"]["name"], "tcp")
        try:
            idle_rss = gateway.status("VmRSS")
            ready, tunnels = [], []

            def open_one(_: int) -> Any:
                started = time.monotonic()
                tunnel = client.start_tunnel(None, ref, "127.0.0.1", 0, trickle=True)
                ready.append(time.monotonic() - started)
                return tunnel

            with ThreadPoolExecutor(sessions + idle) as pool:  # all negotiating at once
                for future in [pool.submit(open_one, i) for i in range(sessions + idle)]:
                    try:
                        tunnels.append(future.result(WAIT * 3))
                    except PamError as exc:
                        row.fail(f"a tunnel did not open: {exc.message}")
            peak = {"rss_kb": gateway.status("VmRSS"), "live": len(gateway.live_sessions())}
            busy, quiet = tunnels[:sessions], tunnels[sessions:]
            load = Proc([sys.executable, str(ROOT / "benchmarks" / "reliability"), "--echo-load",
                         ",".join(str(t.port) for t in busy), "--size", str(size)])
            results = json.loads(load.wait_for(r"^\[", timeout=WAIT * 6)[1].string)
            quiet_ok = sum(1 for t in quiet if echo_roundtrip(t.port, b"still here") == b"still here")
            states = [f"{t.state}: {t.reason}" if t.reason else t.state for t in tunnels]
            for tunnel in tunnels:
                client.stop_tunnel(tunnel.id)
        finally:
            client.shutdown()
            gateway.stop()
    finally:
        target.stop()
    intact = sum(results)
    if intact != sessions:
        row.fail(f"{sessions - intact} transfers damaged or cut (tunnels: "
                 f"{', '.join(f'{n} {state}' for state, n in Counter(states).items())})", sessions - intact)
    if quiet_ok != idle:
        row.fail(f"{idle - quiet_ok} of {idle} idle tunnels were dropped while the others were busy", idle - quiet_ok)
    if peak["live"] != sessions + idle:
        row.fail(f"the gateway held {peak['live']} sessions at once, not {sessions + idle}")
    ready.sort()
    per_session_kb = (peak["rss_kb"] - idle_rss) / (sessions + idle)
    row.tried = (f"{sessions} tunnels opened at once against one gateway process, then each echoing "
                 f"{size / 2 ** 20:g} MiB at the same time (the load in its own process), {idle} more idle")
    row.survived = (f"{intact}/{sessions} transfers intact (sha256), {quiet_ok}/{idle} idle tunnels still up, "
                    f"{peak['live']} sessions live together; "
                    f"ready p50 {_pct(ready, 50):.2f} s, p95 {_pct(ready, 95):.2f} s; gateway "
                    f"~{per_session_kb / 1024:.1f} MiB RSS per session")
    row.figures = {"ready_s": ready, "idle_rss_kb": idle_rss, "peak": peak, "per_session_kb": per_session_kb,
                   "tunnel_states": dict(Counter(states))}
    return row


def _pct(values: list[float], pct: int) -> float:
    return values[min(len(values) - 1, int(len(values) * pct / 100))] if values else 0.0


def open_close_cycles(cycles: int, folder: Path, warmup: int = 10) -> Row:
    """Open a tunnel, move bytes, close it, many times: gateway RSS and client fds/threads stay put."""
    row = Row("leaks: open/close cycles", "", cycles, "")
    with EchoServer() as echo:
        config = make_config([echo_resource(echo)], router={"rate_limit": 1000, "rate_burst": 1000})
        port = free_port()
        gateway = serve(config, folder, port)
        client = runtime(f"http://127.0.0.1:{port}", token(config, "alice"))
        ref = ResourceRef("echo", config["gateway"]["name"], "tcp")
        data = payload(64 * 1024, 5)

        def cycle() -> None:
            tunnel = client.start_tunnel(None, ref, "127.0.0.1", 0, trickle=True)
            try:
                if echo_roundtrip(tunnel.port, data) != data:
                    row.fail("a cycle's transfer was damaged")
            finally:
                client.stop_tunnel(tunnel.id)

        try:
            for _ in range(warmup):
                cycle()
            before = (gateway.status("VmRSS"), gateway.fd_count(), open_fds(), {t.name for t in threading.enumerate()})
            for index in range(cycles):
                try:
                    cycle()
                except PamError as exc:
                    row.fail(f"cycle {index}: {exc.message}")
            # The last close is still being done at the gateway (its peer's sockets): let it
            # finish, bounded; a descriptor that stays is still counted below.
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: gateway.fd_count() <= before[1] and not gateway.live_sessions(), timeout=5)
            after = (gateway.status("VmRSS"), gateway.fd_count(), open_fds(), {t.name for t in threading.enumerate()})
            live = gateway.live_sessions()
        finally:
            client.shutdown()
            gateway.stop()
    growth_mb = (after[0] - before[0]) / 1024
    new_fds, new_threads = after[2] - before[2], after[3] - before[3]
    if growth_mb >= RSS_BOUND_MB:
        row.fail(f"gateway RSS grew {growth_mb:.1f} MB (bound {RSS_BOUND_MB:g} MB)")
    if new_fds or new_threads:
        row.fail(f"client kept {len(new_fds)} more fds and threads {sorted(new_threads)}")
    if after[1] > before[1] or live:
        row.fail(f"gateway fds {before[1]} -> {after[1]}, sessions still live: {sorted(live)}")
    row.tried = f"tunnel open, 64 KiB echoed, close, in one client process against one gateway process (after {warmup} warm-up)"
    row.survived = (f"gateway RSS {growth_mb:+.1f} MB ({before[0] / 1024:.0f} -> {after[0] / 1024:.0f} MB), "
                    f"gateway fds {before[1]} -> {after[1]}, client fds {len(before[2])} -> {len(after[2])}, "
                    f"threads {len(before[3])} -> {len(after[3])}; no session left")
    row.figures = {"gateway_rss_kb": [before[0], after[0]], "gateway_fds": [before[1], after[1]],
                   "client_fds": [len(before[2]), len(after[2])], "client_threads": [len(before[3]), len(after[3])]}
    return row
