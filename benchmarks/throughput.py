"""Tunnel throughput vs direct loopback TCP, in the same run, every transfer sha256-checked.

The bulk target (benchmarks/tcp_target.py) and the gateway agent run as separate processes;
the client runtime runs here, on its own loop thread; the load (benchmarks/tcp_load.py) is one
more process, as a tunnel's real user is. For each connection count N the --mib total is split
over N parallel connections, once straight to the target ("direct") and once through one
`pam tunnel start` ("tunnel"), upload (client -> target) and download (target -> client) apart. MB/s is 10^6 bytes per second,
aggregate over the N connections; the figure per (N, direction, path) is the median of --runs.
Everything shares this machine's cores: client, gateway, target and load generator.

    python benchmarks/throughput.py [--mib 64] [--connections 1,4] [--runs 5] [--json FILE]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _stack
from commander_pam_plugin.negotiation import ConnectOptions

GATEWAY = "gw-main"
TARGETS_MBPS = {1: 20.0, 4: 25.0}


def transfer(port: int, bulk_port: int, direction: str, mib: int, connections: int) -> float:
    """One load process (benchmarks/tcp_load.py): aggregate MB/s of N checked transfers."""
    result = subprocess.run([sys.executable, str(_stack.HERE / "tcp_load.py"), "--port", str(port),
                             "--bulk-port", str(bulk_port), "--direction", direction, "--mib", str(mib),
                             "--connections", str(connections)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{direction} through port {port} failed: {result.stderr.strip()[-500:]}")
    return float(json.loads(result.stdout)["mbps"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    counts = [int(c) for c in args.connections.split(",")]
    directions = [d for d in ("upload", "download") if d in args.directions.split(",")]
    # figures[n][direction][path] = list of MB/s; cpu[n][direction][side] = list of CPU ms per MB
    figures: dict[str, dict[str, dict[str, list[float]]]] = {}
    cpu: dict[str, dict[str, dict[str, list[float]]]] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pam-bench-") as tmp, \
            _stack.Stack(Path(tmp), [_stack.GatewaySpec(GATEWAY)], ssh=False) as stack:
        bulk_port, agent = stack.tcp_ports["bulk"], stack.agents[GATEWAY]
        runtime = stack.runtime(("127.0.0.1",))
        tunnel = _stack.open_tunnel(runtime, "bulk", ConnectOptions())
        try:
            for n in counts:
                for index in range(args.runs):
                    for direction in directions:
                        for path, port in (("direct", bulk_port), ("tunnel", tunnel.port)):
                            before = (_stack.process_cpu_seconds(os.getpid()), agent.cpu_seconds())
                            mbps = transfer(port, bulk_port, direction, args.mib, n)
                            figures.setdefault(str(n), {}).setdefault(direction, {}).setdefault(path, []).append(mbps)
                            if path == "tunnel":  # CPU per MB: a figure the other processes on the cores cannot blur
                                megabytes = args.mib * (1 << 20) / 1e6
                                spent = (_stack.process_cpu_seconds(os.getpid()) - before[0],
                                         agent.cpu_seconds() - before[1])
                                sides = cpu.setdefault(str(n), {}).setdefault(direction, {})
                                for side, seconds in zip(("client", "gateway"), spent):
                                    sides.setdefault(side, []).append(seconds * 1000 / megabytes)
                print(f"{n} connection(s) done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
        finally:
            _stack.close_tunnel(runtime, tunnel)
            runtime.shutdown()
    return report(figures, cpu, args, time.monotonic() - started)


def _gateway_loop() -> str:
    """What `pam-gateway` runs on here (commander_pam_plugin.loop.run_main picks uvloop when installed)."""
    return "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


def report(figures: dict[str, Any], cpu: dict[str, Any], args: argparse.Namespace,
           elapsed: float) -> dict[str, Any]:
    result: dict[str, Any] = {
        "meta": {**_stack.machine(), "mib_total": args.mib, "runs": args.runs, "elapsed_s": round(elapsed, 1),
                 "gateway_loop": _gateway_loop(),
                 "unit": "MB/s = 10^6 bytes/s, aggregate over the connections; median of runs",
                 "cpu_note": "CPU ms per MB moved through the tunnel, client process and gateway agent process; "
                        "cpu_bound_mbps = 1000 / the larger: the rate with one core each and nothing else",
                 "note": "client, gateway, target and load generator share the machine's cores"},
        "connections": {}, "targets": {}}
    for n, per in figures.items():
        entry: dict[str, Any] = {}
        for direction, paths in per.items():
            tunnel = statistics.median(paths["tunnel"])
            direct = statistics.median(paths["direct"])
            sides = {side: round(statistics.median(v), 2) for side, v in cpu[n][direction].items()}
            entry[direction] = {"tunnel_mbps": round(tunnel, 2), "direct_mbps": round(direct, 2),
                                "ratio_tunnel_to_direct": round(tunnel / direct, 4),
                                "cpu_ms_per_mb": sides, "cpu_bound_mbps": round(1000 / max(sides.values()), 1),
                                "tunnel_samples": [round(x, 2) for x in paths["tunnel"]],
                                "direct_samples": [round(x, 2) for x in paths["direct"]]}
        entry["tunnel_mbps_min_direction"] = min(entry[d]["tunnel_mbps"] for d in per)
        result["connections"][n] = entry
        if int(n) in TARGETS_MBPS:
            goal = TARGETS_MBPS[int(n)]
            result["targets"][f"{n}_connection_tunnel_mbps >= {goal:g}"] = \
                entry["tunnel_mbps_min_direction"] >= goal
    return result


def print_report(result: dict[str, Any]) -> None:
    meta = result["meta"]
    print(f"{meta['mib_total']} MiB per transfer (split over the connections), {meta['runs']} runs, "
          f"gateway on {meta['gateway_loop']}, {meta['elapsed_s']:g} s")
    print("connections  direction   tunnel MB/s   direct MB/s   tunnel/direct   CPU ms/MB client  gateway")
    for n, entry in result["connections"].items():
        for direction in ("upload", "download"):
            if direction not in entry:
                continue
            e = entry[direction]
            print(f"{n:>11}  {direction:<9} {e['tunnel_mbps']:12.1f} {e['direct_mbps']:13.1f} "
                  f"{e['ratio_tunnel_to_direct']:15.4f} {e['cpu_ms_per_mb']['client']:17.1f} "
                  f"{e['cpu_ms_per_mb']['gateway']:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="MiB per transfer, split over the connections")
    parser.add_argument("--connections", default="1,4", help="comma-separated connection counts (default 1,4)")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure; the median is reported (default 5)")
    parser.add_argument("--directions", default="upload,download", help="upload, download or both (default)")
    parser.add_argument("--json", metavar="FILE", help="write every figure to this JSON file")
    args = parser.parse_args()
    if args.mib < 1 or args.runs < 1:
        parser.error("--mib and --runs must be >= 1")
    _stack.emit(run(args), print_report, args.json)


if __name__ == "__main__":
    main()
