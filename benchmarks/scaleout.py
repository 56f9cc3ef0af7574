"""Several router nodes over Redis against one router node, in the same run, on this machine.

Layout per configuration: 4 gateway agents (`pam-gateway agent`, one process each, each serving
the pooled resource "echo" and listing every router node), router nodes as `pam-gateway router`
processes, an echo target, and --users client runtimes (one PamRuntime each, as one shell
would), user i on node i mod N. --sessions tunnels open at the same instant, spread over the
users; each is timed from the release to its first echoed byte, then moves --kib KiB checked by
sha256. Configurations: "1 node, in memory" (today's router) and "3 nodes, Redis"; optionally
"2 nodes, Redis" (--with-two) for what one more node adds. Redis operations per connect are
Redis's own total_commands_processed over the concurrent phase divided by the connects, with
the idle heartbeat rate (measured just before) subtracted and also reported.

The cores are shared with other work: compare the configurations' ratio, not absolute times;
the load average is in the report.

    python benchmarks/scaleout.py [--sessions 200] [--users 20] [--kib 64] [--with-two] [--json FILE]
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import _stack  # noqa: E402
import redis  # noqa: E402
from gateway_support import EchoServer, new_token  # noqa: E402
from scaleout_support import RedisServer, RouterNode, write_config  # noqa: E402

from commander_pam_plugin.config import PamConfig  # noqa: E402
from commander_pam_plugin.negotiation import ConnectOptions  # noqa: E402
from commander_pam_plugin.runtime import PamRuntime  # noqa: E402

GATEWAYS = ("gw-1", "gw-2", "gw-3", "gw-4")
START_TIMEOUT_S = 30.0


class ManyEcho(EchoServer):
    """The echo target with a listen backlog for hundreds of connects at once (socketserver's is 5)."""

    request_queue_size = 1024


class Agent:
    """`pam-gateway agent` in its own process, dialling every router node in turn."""

    def __init__(self, directory: Path, name: str, token: str, urls: list[str], echo_port: int) -> None:
        self.name = name
        config = write_config(directory, f"agent-{name}", {
            "gateway": {"name": name, "token": token, "router_url": urls, "host_addresses": ["127.0.0.1"]},
            "resources": [{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo_port}]})
        self.process = subprocess.Popen([sys.executable, "-m", "commander_pam_plugin.gateway", "agent",
                                         "--config", str(config)], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.online = threading.Event()
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self.online.wait(START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"gateway {name} did not come online")

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            if f"gateway {self.name} online" in line:
                self.online.set()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def exact_echo(port: int, data: bytes) -> bool | str:
    """`data` through the tunnel and exactly as many bytes back, sha256-compared (no half-close:
    the signaling plane is what differs between configurations, not the end of a stream)."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sender = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
        sender.start()
        while len(received) < len(data) and (block := sock.recv(1 << 16)):
            received.extend(block)
        sender.join(60)
    if _stack.sha256_hex(bytes(received)) == _stack.sha256_hex(data):
        return True
    return f"{'short' if len(received) < len(data) else 'different'}: {len(received)} of {len(data)} bytes"


def redis_commands(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("stats")["total_commands_processed"])
    finally:
        client.close()


def one_configuration(tmp: Path, label: str, nodes: int, redis_url: str | None, args: argparse.Namespace,
                      echo: EchoServer) -> dict[str, Any]:
    users = {f"user-{i:02d}": new_token() for i in range(args.users)}
    tokens = {g: new_token() for g in GATEWAYS}
    router_config = {"router": {"rate_limit": 1000.0, "rate_burst": 10_000},
                     "users": [{"name": u, "token": t} for u, t in users.items()],
                     "gateways": [{"name": g, "token": t, "resources": ["echo"]} for g, t in tokens.items()]}
    directory = tmp / label.replace(" ", "-").replace(",", "")
    directory.mkdir()
    routers = [RouterNode(directory, f"n{i}", router_config, redis_url).start() for i in range(nodes)]
    agents: list[Agent] = []
    runtimes: list[PamRuntime] = []
    tunnels: list[tuple[PamRuntime, Any]] = []
    try:
        urls = [r.url for r in routers]
        for index, name in enumerate(GATEWAYS):  # gateway i starts on node i mod N
            agents.append(Agent(directory, name, tokens[name], urls[index % nodes:] + urls[:index % nodes],
                                echo.port))
        options = ConnectOptions(trickle=True, timeout_s=120.0)
        for index, token in enumerate(users.values()):
            node_urls = urls[index % nodes:] + urls[:index % nodes]
            runtimes.append(PamRuntime(PamConfig(router_url=",".join(node_urls), token=token,
                                                 host_addresses=("127.0.0.1",))))
        for runtime in runtimes:  # first-use costs (imports, sessions) are not figures
            warm = _stack.open_tunnel(runtime, "echo", options)
            _stack.close_tunnel(runtime, warm)
        idle_rate = 0.0
        if redis_url:
            before, t = redis_commands(redis_url), time.monotonic()
            time.sleep(2.0)  # the idle heartbeat rate, to subtract (a measurement window, not a wait)
            idle_rate = (redis_commands(redis_url) - before) / (time.monotonic() - t)
            commands_before = redis_commands(redis_url)
        t0: list[float] = []
        gate = threading.Lock()

        def open_one(index: int) -> tuple[PamRuntime, Any, float]:
            with gate:
                if not t0:
                    t0.append(time.perf_counter())
            runtime = runtimes[index % len(runtimes)]
            tunnel = _stack.open_tunnel(runtime, "echo", options)
            with _stack.first_echo(tunnel.port):
                return runtime, tunnel, (time.perf_counter() - t0[0]) * 1000

        phase_start = time.monotonic()
        results = _stack.in_threads(args.sessions, open_one)
        phase_s = time.monotonic() - phase_start
        ops = None
        if redis_url:
            raw = redis_commands(redis_url) - commands_before
            ops = {"raw_per_connect": round(raw / args.sessions, 1),
                   "idle_per_s": round(idle_rate, 1),
                   "per_connect_minus_idle": round((raw - idle_rate * phase_s) / args.sessions, 1)}
        opened = [r for r in results if not isinstance(r, Exception)]
        failures = [r for r in results if isinstance(r, Exception)]
        tunnels = [(r[0], r[1]) for r in opened]
        ready = [r[2] for r in opened]
        payload = os.urandom(args.kib * 1024)
        intact = _stack.in_threads(len(tunnels), lambda i: exact_echo(tunnels[i][1].port, payload))
    finally:
        _stack.close_all(tunnels, runtimes)
        for agent in agents:
            agent.stop()
        for router in routers:
            router.stop()
    return {"label": label, "nodes": nodes, "redis": bool(redis_url),
            "ready_ms": {**_stack.summary(ready), "p50": _stack.percentile(ready, 0.5) if ready else None,
                         "p95": _stack.percentile(ready, 0.95) if ready else None},
            "opened": len(opened), "failed": len(failures), "errors": sorted({str(f)[:200] for f in failures}),
            "intact": sum(1 for r in intact if r is True), "redis_ops": ops,
            "transfer_errors": sorted({(r if isinstance(r, str) else repr(r))[:60] for r in intact if r is not True})[:10],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pam-scaleout-") as tmp, ManyEcho() as echo, RedisServer() as server:
        rows.append(one_configuration(Path(tmp), "1 node, in memory", 1, None, args, echo))
        if args.with_two:
            rows.append(one_configuration(Path(tmp), "2 nodes, Redis", 2, server.url, args, echo))
        rows.append(one_configuration(Path(tmp), "3 nodes, Redis", 3, server.url, args, echo))
    base, three = rows[0]["ready_ms"], rows[-1]["ready_ms"]
    ratio = {k: round(three[k] / base[k], 3) if base.get(k) and three.get(k) else None for k in ("p50", "p95")}
    return {"meta": {**_stack.machine(), "sessions": args.sessions, "users": args.users, "gateways": len(GATEWAYS),
                     "kib": args.kib, "elapsed_s": round(time.monotonic() - started, 1),
                     "note": "cores shared with other work: compare ratios, not absolute times"},
            "configurations": rows, "ratio_3_nodes_to_1": ratio,
            "targets": {f"{r['label']}: all {args.sessions} opened and intact":
                        r["opened"] == r["intact"] == args.sessions for r in rows}}


def print_report(result: dict[str, Any]) -> None:
    meta = result["meta"]
    print(f"{meta['sessions']} tunnels at once from {meta['users']} users, {meta['gateways']} gateways, "
          f"{meta['elapsed_s']:g} s, load average {meta['loadavg_1_5_15']}")
    for row in result["configurations"]:
        r = row["ready_ms"]
        ops = row["redis_ops"]
        extra = (f"; Redis ops/connect {ops['per_connect_minus_idle']} (raw {ops['raw_per_connect']}, "
                 f"idle {ops['idle_per_s']}/s)") if ops else ""
        print(f"  {row['label']:<18} p50 {r['p50']:.0f} ms, p95 {r['p95']:.0f} ms, max {r['max']} ms; "
              f"opened {row['opened']}, intact {row['intact']}, failed {row['failed']}{extra}")
    print(f"  3 nodes / 1 node: p50 x{result['ratio_3_nodes_to_1']['p50']}, p95 x{result['ratio_3_nodes_to_1']['p95']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--kib", type=int, default=64)
    parser.add_argument("--with-two", action="store_true", help="also 2 nodes (what one more node adds)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    _stack.emit(run(args), print_report, args.json)


if __name__ == "__main__":
    main()
