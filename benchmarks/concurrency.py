"""Many tunnels opened at once against one gateway process: time to ready, integrity, gateway memory.

The same process layout and latency model as connect.py (router, gateway agent and echo target
as processes; one-way D on both signaling legs). First the single-tunnel median (sequential
runs), then --tunnels threads each run `pam tunnel start` at the same instant (one client
runtime, as one shell would) and time their first echoed byte; with every tunnel up, each
pushes --kib KiB of random bytes through its tunnel and checks the echo's sha256. Gateway
memory is the agent process's VmRSS with every session up, minus before, per session.

    python benchmarks/concurrency.py [--tunnels 50] [--one-way-ms 125] [--kib 256] [--json FILE]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _stack
from commander_pam_plugin.negotiation import ConnectOptions

GATEWAY = "gw-main"
TARGET_P95_RATIO = 3.0


def echo_check(port: int, data: bytes) -> bool:
    """Send data through the tunnel while reading the echo; True if what came back is identical."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        def send() -> None:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        while block := sock.recv(1 << 16):
            received.extend(block)
        sender.join(60)
    return _stack.sha256_hex(bytes(received)) == _stack.sha256_hex(data)


def open_ready(runtime: Any, options: ConnectOptions, start: float) -> tuple[Any, float]:
    """Open one tunnel to the echo target; (tunnel, ms from `start` to the first echoed byte)."""
    tunnel = _stack.open_tunnel(runtime, "echo", options)
    with _stack.first_echo(tunnel.port):
        return tunnel, (time.perf_counter() - start) * 1000


def run(args: argparse.Namespace) -> dict[str, Any]:
    addresses = _stack.host_addresses(args.host_addresses)
    options = ConnectOptions(trickle=True, timeout_s=60.0)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pam-bench-") as tmp, \
            _stack.Stack(Path(tmp), [_stack.GatewaySpec(GATEWAY)], ssh=False, gateway_addresses=addresses,
                         # the router's default (64 open conversations per user) would refuse 200 at once
                         router_settings={"max_conversations_per_user": args.tunnels + 16}) as stack:
        agent = stack.agents[GATEWAY]
        runtime = stack.runtime(addresses)
        tunnels: list[Any] = []
        try:
            warm, _ = open_ready(runtime, options, time.perf_counter())  # first-use costs are not figures
            _stack.close_tunnel(runtime, warm)
            stack.set_one_way(args.one_way_ms / 1000)
            single = []
            for _ in range(args.single_runs):
                _stack.refresh_resources(runtime)
                tunnel, ready = open_ready(runtime, options, time.perf_counter())
                single.append(ready)
                stack.set_one_way(0.0)
                _stack.close_tunnel(runtime, tunnel)
                stack.set_one_way(args.one_way_ms / 1000)
            _stack.refresh_resources(runtime)
            rss_before = agent.rss_kib()
            t0: list[float] = []
            gate = threading.Lock()

            def open_one(index: int) -> tuple[Any, float]:
                with gate:  # every thread is past the barrier: the clock starts once, for all
                    if not t0:
                        t0.append(time.perf_counter())
                return open_ready(runtime, options, t0[0])

            print(f"concurrent open: client pid {os.getpid()}, gateway pid {agent.process.pid}",
                  file=sys.stderr, flush=True)  # for a profiler (py-spy) to attach to
            cpu_before = (_stack.process_cpu_seconds(os.getpid()), agent.cpu_seconds())
            results = _stack.in_threads(args.tunnels, open_one)
            cpu_after = (_stack.process_cpu_seconds(os.getpid()), agent.cpu_seconds())
            tunnels = [r[0] for r in results if not isinstance(r, Exception)]
            failures = [r for r in results if isinstance(r, Exception)]
            ready = [r[1] for r in results if not isinstance(r, Exception)]
            rss_up = agent.rss_kib()
            sessions_up = len(tunnels)
            payload = os.urandom(args.kib * 1024)
            stack.set_one_way(0.0)  # the data plane never crosses the proxies; closing is not timed
            intact = _stack.in_threads(len(tunnels), lambda i: echo_check(tunnels[i].port, payload))
            rss_after = agent.rss_kib()
        finally:
            stack.set_one_way(0.0)
            for tunnel in tunnels:
                _stack.close_tunnel(runtime, tunnel)
            runtime.shutdown()
    ok = sum(1 for r in intact if r is True)
    median_single = statistics.median(single)
    p50, p95 = (_stack.percentile(ready, 0.50), _stack.percentile(ready, 0.95)) if ready else (None, None)
    ratio = round(p95 / median_single, 3) if p95 is not None else None
    result = {
        "meta": {**_stack.machine(), "tunnels": args.tunnels, "one_way_ms": args.one_way_ms, "kib": args.kib,
                 "host_addresses": args.host_addresses, "elapsed_s": round(time.monotonic() - started, 1),
                 "latency": "one-way D on client<->router and gateway<->router; data plane on loopback",
                 "memory": "gateway agent VmRSS with every session up minus before, per session"},
        "single_ready_ms": _stack.summary(single),
        "concurrent_ready_ms": {**_stack.summary(ready), "p50": p50, "p95": p95},
        "ratio_p95_to_single_median": ratio,
        # CPU while all of them were opened, per tunnel: the client process (its threads include the
        # benchmark's opener threads, a shell's command threads) and the gateway agent
        "cpu_ms_per_setup": {"client": round(1000 * (cpu_after[0] - cpu_before[0]) / args.tunnels, 2),
                             "gateway": round(1000 * (cpu_after[1] - cpu_before[1]) / args.tunnels, 2)},
        "opened": sessions_up, "failed_to_open": len(failures),
        "open_errors": sorted({str(f)[:200] for f in failures}),
        "transfers_intact": ok, "transfers": len(tunnels), "transfer_kib_each": args.kib,
        "gateway_rss_kib": {"before": rss_before, "all_up": rss_up, "after_transfers": rss_after},
        "gateway_rss_kib_per_session": round((rss_up - rss_before) / max(sessions_up, 1), 1),
        "targets": {f"all {args.tunnels} intact": ok == args.tunnels,
                    f"ratio_p95_to_single_median <= {TARGET_P95_RATIO:g}":
                        ratio is not None and ratio <= TARGET_P95_RATIO}}
    return result


def print_report(result: dict[str, Any]) -> None:
    meta, c, s = result["meta"], result["concurrent_ready_ms"], result["single_ready_ms"]
    print(f"{meta['tunnels']} tunnels at once, D = {meta['one_way_ms']:g} ms one way, {meta['elapsed_s']:g} s")
    print(f"  single tunnel ready: median {s['median']} ms (min {s['min']}, max {s['max']}, n {s['n']})")
    print(f"  concurrent ready:    p50 {c['p50']:.1f} ms, p95 {c['p95']:.1f} ms, max {c['max']} ms; "
          f"p95 / single median = {result['ratio_p95_to_single_median']}")
    cpu = result["cpu_ms_per_setup"]
    print(f"  CPU per setup while they opened: client {cpu['client']} ms, gateway {cpu['gateway']} ms; "
          f"load {meta['loadavg_1_5_15']}")
    print(f"  opened {result['opened']}, failed {result['failed_to_open']}; transfers intact "
          f"{result['transfers_intact']}/{result['transfers']} ({meta['kib']} KiB each way)")
    rss = result["gateway_rss_kib"]
    print(f"  gateway RSS {rss['before']} KiB -> {rss['all_up']} KiB with all up "
          f"({result['gateway_rss_kib_per_session']} KiB per session), {rss['after_transfers']} KiB after transfers")
    for error in result["open_errors"]:
        print(f"  open error: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tunnels", type=int, default=50, help="tunnels opened at once (default 50)")
    parser.add_argument("--one-way-ms", type=float, default=125.0, help="injected one-way delay D (default 125)")
    parser.add_argument("--single-runs", type=int, default=5, help="sequential single-tunnel runs (default 5)")
    parser.add_argument("--kib", type=int, default=256, help="KiB echoed through each tunnel (default 256)")
    parser.add_argument("--host-addresses", type=int, default=1, help="ICE host addresses on each side (default 1)")
    parser.add_argument("--json", metavar="FILE", help="write every figure to this JSON file")
    args = parser.parse_args()
    if args.tunnels < 1 or args.single_runs < 1 or args.kib < 1:
        parser.error("--tunnels, --single-runs and --kib must be >= 1")
    _stack.emit(run(args), print_report, args.json)


if __name__ == "__main__":
    main()
