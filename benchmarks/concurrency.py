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
import gc
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
from commander_pam_plugin import dtls_certificate, negotiation
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


def thread_cpu_seconds(native_id: int) -> float:
    """utime + stime of one thread of this process; 0 once it has ended."""
    try:
        fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class GcTimer:
    """Time this process spends in the garbage collector (gc.callbacks), to tell it from real work."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections[info["generation"]] += 1

    def close(self) -> None:
        gc.callbacks.remove(self._callback)


def open_ready(runtime: Any, options: ConnectOptions, start: float) -> tuple[Any, float]:
    """Open one tunnel to the echo target; (tunnel, ms from `start` to the first echoed byte)."""
    tunnel = _stack.open_tunnel(runtime, "echo", options)
    with _stack.first_echo(tunnel.port):
        return tunnel, (time.perf_counter() - start) * 1000


def one_round(args: argparse.Namespace) -> dict[str, Any]:
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
            loop_thread = runtime.loop._thread.native_id
            proxy_thread = stack.proxy_loop._thread.native_id  # the benchmark's latency model, not the plugin
            loop_before, proxy_before = thread_cpu_seconds(loop_thread), thread_cpu_seconds(proxy_thread)
            gc_timer = GcTimer()
            try:
                results = _stack.in_threads(args.tunnels, open_one)
            finally:
                gc_timer.close()
            cpu_after = (_stack.process_cpu_seconds(os.getpid()), agent.cpu_seconds())
            loop_cpu = thread_cpu_seconds(loop_thread) - loop_before
            proxy_cpu = thread_cpu_seconds(proxy_thread) - proxy_before
            listener_cpu = sum(thread_cpu_seconds(r[0].session.listener._thread.native_id)  # started for this burst
                               for r in results if not isinstance(r, Exception) and r[0].session is not None)
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
        # CPU while all of them were opened, per tunnel: the client process without the benchmark's
        # latency proxies (its opener threads stand for a shell's command threads) and the gateway agent
        "cpu_ms_per_setup": {"client": round(1000 * (cpu_after[0] - cpu_before[0] - proxy_cpu) / args.tunnels, 2),
                             "client_process_with_proxies": round(1000 * (cpu_after[0] - cpu_before[0]) / args.tunnels, 2),
                             "gateway": round(1000 * (cpu_after[1] - cpu_before[1]) / args.tunnels, 2)},
        "client_cpu_ms_per_setup_by_thread": {
            "loop": round(1000 * loop_cpu / args.tunnels, 2),
            "stream_listeners": round(1000 * listener_cpu / args.tunnels, 2),
            "callers_and_rest": round(1000 * (cpu_after[0] - cpu_before[0] - proxy_cpu - loop_cpu - listener_cpu)
                                      / args.tunnels, 2),
            "benchmark_latency_proxies": round(1000 * proxy_cpu / args.tunnels, 2)},
        "client_gc_while_opening": {"ms": round(1000 * gc_timer.seconds, 1),
                                    "collections_by_generation": gc_timer.collections},
        "opened": sessions_up, "failed_to_open": len(failures),
        "open_errors": sorted({str(f)[:200] for f in failures}),
        "transfers_intact": ok, "transfers": len(tunnels), "transfer_kib_each": args.kib,
        "gateway_rss_kib": {"before": rss_before, "all_up": rss_up, "after_transfers": rss_after},
        "gateway_rss_kib_per_session": round((rss_up - rss_before) / max(sessions_up, 1), 1),
        "targets": {f"all {args.tunnels} intact": ok == args.tunnels,
                    f"ratio_p95_to_single_median <= {TARGET_P95_RATIO:g}":
                        ratio is not None and ratio <= TARGET_P95_RATIO}}
    return result


# (name, PAM_SHARED_CERT, negotiation.POOL_MAXSIZE): the setup path before this work (a DTLS
# certificate and context per peer, 64 kept-alive router connections), and as shipped.
VARIANTS = (("before", "0", 64), ("tuned", "1", negotiation.POOL_MAXSIZE))
MEDIAN_KEYS = ("ratio_p95_to_single_median",)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """--rounds rounds, the variants interleaved in each; medians per variant."""
    started = time.monotonic()
    load_before = _stack.machine()["loadavg_1_5_15"]
    rounds: dict[str, list[dict[str, Any]]] = {}
    for round_index in range(args.rounds):
        for name, shared_cert, pool in VARIANTS:
            if name not in args.variants:
                continue
            original_pool = negotiation.POOL_MAXSIZE
            negotiation.POOL_MAXSIZE = pool
            try:
                with _stack.environment(dtls_certificate.ENV, shared_cert):
                    rounds.setdefault(name, []).append(one_round(args))
            finally:
                negotiation.POOL_MAXSIZE = original_pool
            print(f"round {round_index + 1} {name} done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    variants: dict[str, Any] = {}
    for name, samples in rounds.items():
        variants[name] = {
            "single_ready_median_ms": statistics.median(r["single_ready_ms"]["median"] for r in samples),
            "concurrent_p50_ms": statistics.median(r["concurrent_ready_ms"]["p50"] for r in samples),
            "concurrent_p95_ms": statistics.median(r["concurrent_ready_ms"]["p95"] for r in samples),
            "ratio_p95_to_single_median": statistics.median(r["ratio_p95_to_single_median"] for r in samples),
            "cpu_ms_per_setup_client": statistics.median(r["cpu_ms_per_setup"]["client"] for r in samples),
            "cpu_ms_per_setup_gateway": statistics.median(r["cpu_ms_per_setup"]["gateway"] for r in samples),
            "client_loop_cpu_ms_per_setup": statistics.median(
                r["client_cpu_ms_per_setup_by_thread"]["loop"] for r in samples),
            "benchmark_proxies_cpu_ms_per_setup": statistics.median(
                r["client_cpu_ms_per_setup_by_thread"]["benchmark_latency_proxies"] for r in samples),
            "client_gc_ms": statistics.median(r["client_gc_while_opening"]["ms"] for r in samples),
            "all_intact": all(r["transfers_intact"] == args.tunnels for r in samples),
            "rounds": samples}
    last = variants.get("tuned") or next(iter(variants.values()))
    meta = {**last["rounds"][-1]["meta"], "loadavg_before": load_before, "rounds": args.rounds,
            "elapsed_s": round(time.monotonic() - started, 1), "variants": [v[0] for v in VARIANTS if v[0] in rounds]}
    targets = {f"{name}: all {args.tunnels} intact": v["all_intact"] for name, v in variants.items()}
    if "tuned" in variants:
        targets[f"tuned: ratio_p95_to_single_median <= {TARGET_P95_RATIO:g}"] = \
            variants["tuned"]["ratio_p95_to_single_median"] <= TARGET_P95_RATIO
    return {"meta": meta, "variants": variants, "targets": targets}


def print_report(result: dict[str, Any]) -> None:
    meta = result["meta"]
    print(f"{meta['tunnels']} tunnels at once, D = {meta['one_way_ms']:g} ms one way, {meta['rounds']} rounds, "
          f"{meta['elapsed_s']:g} s; load {meta['loadavg_before']} -> {meta['loadavg_1_5_15']}")
    for name, v in result["variants"].items():
        print(f"  {name:<7} single {v['single_ready_median_ms']:.1f} ms; concurrent p50 {v['concurrent_p50_ms']:.1f} "
              f"p95 {v['concurrent_p95_ms']:.1f} ms; p95 / single = {v['ratio_p95_to_single_median']:.2f}; CPU per "
              f"setup client {v['cpu_ms_per_setup_client']} ms (loop thread {v['client_loop_cpu_ms_per_setup']}; the "
              f"benchmark's proxies {v['benchmark_proxies_cpu_ms_per_setup']} more), "
              f"gateway {v['cpu_ms_per_setup_gateway']} ms; client GC {v['client_gc_ms']} ms")
        for r in v["rounds"]:
            for error in r["open_errors"]:
                print(f"    open error: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tunnels", type=int, default=50, help="tunnels opened at once (default 50)")
    parser.add_argument("--one-way-ms", type=float, default=125.0, help="injected one-way delay D (default 125)")
    parser.add_argument("--single-runs", type=int, default=5, help="sequential single-tunnel runs (default 5)")
    parser.add_argument("--kib", type=int, default=256, help="KiB echoed through each tunnel (default 256)")
    parser.add_argument("--host-addresses", type=int, default=1, help="ICE host addresses on each side (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the variants interleaved (default 3)")
    parser.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                        help="comma-separated subset of %(default)s")
    parser.add_argument("--json", metavar="FILE", help="write every figure to this JSON file")
    args = parser.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.tunnels < 1 or args.single_runs < 1 or args.kib < 1 or args.rounds < 1:
        parser.error("--tunnels, --single-runs, --kib and --rounds must be >= 1")
    _stack.emit(run(args), print_report, args.json)


if __name__ == "__main__":
    main()
