"""CPU that idle pam tunnels cost each side: N tunnels (one peer connection each) open and idle.

For each variant (VARIANTS: stock, PAM_SCTP_TUNING=0 on the client peers and the gateway agent,
ICE consent every 0.5 s; before, idle_consent.py as it was before the one-sided mode and the
shared consent clock, PAM_CONSENT_MODE=both PAM_CONSENT_CLOCK=0: each side checks every 2 s on
its own timer; each of the two changes alone; tuned, the default: the client checks every 2 s
on the loop's shared tick, the gateway only once the client's checks stop arriving) N tunnels
are opened (--per-stack of them per router, gateway agent and client runtime; by default all of
them on one, as one shell and one gateway run them), each carries one byte, then all stay idle for
--seconds. Reported, as a percentage of one core over that window: the plugin's threads in this
process (each runtime's loop thread and each session's stream listener: what a shell running
these tunnels spends), the gateway agents (summed), and the whole client process, which also
runs the benchmark's latency proxies and log readers. Variants alternate over --rounds;
medians. Other work on the cores shows in the load average kept in the JSON.

    python benchmarks/idle.py [--tunnels 200] [--seconds 20] [--rounds 3] [--per-stack 200]
                              [--variants stock,before,...] [--json FILE]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _paths
import _stack
from commander_pam_plugin import idle_consent
from commander_pam_plugin.negotiation import ConnectOptions

BATCH = 20  # tunnels opened at once
# (name, PAM_SCTP_TUNING, PAM_CONSENT_MODE, PAM_CONSENT_CLOCK): aiortc's own classes and
# every-0.5 s checks; "before": each side checking every 2 s on its own timer (idle_consent.py as
# it was before the one-sided mode and the shared clock); each change alone; tuned as shipped.
VARIANTS = (("stock", "0", "both", "0"), ("before", "1", "both", "0"), ("clock-only", "1", "both", "1"),
            ("one-sided-only", "1", "one-sided", "0"), ("tuned", "1", "one-sided", "1"))
PER_STACK = 200  # tunnels per router, gateway agent and client runtime (one shell, one gateway)


def threads_cpu_seconds(native_ids: list[int]) -> float:
    """utime + stime of these threads of this process (/proc/self/task/TID/stat); a gone thread counts 0."""
    total = 0.0
    for tid in native_ids:
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def one_round(workdir: Path, tuning_value: str, consent_mode: str, clock: str, tunnels: int, seconds: float,
              per_stack: int = PER_STACK) -> dict[str, float]:
    stacks: list[Any] = []
    runtimes: list[Any] = []
    opened: list[tuple[Any, Any]] = []
    try:
        with _paths.tuning(tuning_value), _stack.environment(idle_consent.MODE_ENV, consent_mode), \
                _stack.environment(idle_consent.CLOCK_ENV, clock):
            for index in range(0, tunnels, per_stack):
                stack_dir = workdir / f"stack-{index // per_stack}"
                stack_dir.mkdir()
                # the router's default (64 open conversations per user) would refuse a shell's 200 tunnels
                stack = _stack.Stack(stack_dir, [_stack.GatewaySpec(_paths.GATEWAY)], ssh=False,
                                     router_settings={"max_conversations_per_user": per_stack + 16}).__enter__()
                stacks.append(stack)
                runtime = stack.runtime(("127.0.0.1",))
                runtimes.append(runtime)
                for start in range(index, min(tunnels, index + per_stack), BATCH):
                    count = min(BATCH, tunnels - start, index + per_stack - start)
                    results = _stack.in_threads(count, lambda _: _stack.open_tunnel(runtime, "echo", ConnectOptions()))
                    failures = [r for r in results if isinstance(r, Exception)]
                    opened += [(runtime, r) for r in results if not isinstance(r, Exception)]
                    if failures:
                        raise RuntimeError(f"{len(failures)} tunnels did not open: {failures[0]}")
        for _, tunnel in opened:  # each tunnel's peer has carried a byte: a session in use, now idle
            _stack.first_echo(tunnel.port).close()
        time.sleep(3.0)  # let set-up work settle before the window
        agents = [stack.agents[_paths.GATEWAY] for stack in stacks]
        # The plugin's own threads (each runtime's loop, each session's stream listener); the rest of
        # this process is the benchmark's (latency proxies, log readers), reported apart.
        loop_threads = [r.loop._thread.native_id for r in runtimes]
        listener_threads = [t.session.listener._thread.native_id for _, t in opened if t.session is not None]
        plugin_threads = loop_threads + listener_threads
        print(f"idle window: client pid {os.getpid()}, gateway pids {[a.process.pid for a in agents]}",
              file=sys.stderr, flush=True)  # for a profiler (py-spy) to attach to
        before = (threads_cpu_seconds(plugin_threads), sum(a.cpu_seconds() for a in agents), time.monotonic(),
                  _stack.process_cpu_seconds(os.getpid()), threads_cpu_seconds(loop_threads))
        time.sleep(seconds)
        after = (threads_cpu_seconds(plugin_threads), sum(a.cpu_seconds() for a in agents), time.monotonic(),
                 _stack.process_cpu_seconds(os.getpid()), threads_cpu_seconds(loop_threads))
        wall = after[2] - before[2]
        return {"client_core_pct": 100 * (after[0] - before[0]) / wall,
                "gateway_core_pct": 100 * (after[1] - before[1]) / wall,
                "client_process_core_pct": 100 * (after[3] - before[3]) / wall,
                "client_loop_core_pct": 100 * (after[4] - before[4]) / wall,  # of client_core_pct
                "tunnels_up": sum(1 for _, t in opened if t.state == "up")}
    finally:
        _stack.close_all(opened, runtimes)
        for stack in stacks:
            stack.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    meta_before = _stack.machine()
    figures: dict[str, list[dict[str, float]]] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pam-idle-") as tmp:
        for round_index in range(args.rounds):
            for name, value, consent_mode, clock in VARIANTS:
                if name not in args.variants:
                    continue
                workdir = Path(tmp) / f"{name}-{round_index}"
                workdir.mkdir()
                figures.setdefault(name, []).append(one_round(workdir, value, consent_mode, clock, args.tunnels,
                                                              args.seconds, args.per_stack))
            print(f"round {round_index + 1} done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    result: dict[str, Any] = {
        "meta": {**_stack.machine(), "loadavg_before": meta_before["loadavg_1_5_15"], "tunnels": args.tunnels, "per_stack": args.per_stack,
                 "seconds": args.seconds, "rounds": args.rounds, "elapsed_s": round(time.monotonic() - started, 1),
                 "unit": "percent of one core over the idle window; medians over rounds"},
        "variants": {}, "targets": {}}
    for name, samples in figures.items():
        result["variants"][name] = {key: round(statistics.median(s[key] for s in samples), 2)
                                    for key in ("client_core_pct", "gateway_core_pct", "client_process_core_pct", "client_loop_core_pct",
                                                 "tunnels_up")}
        result["variants"][name]["samples"] = samples
    tuned = result["variants"].get("tuned")
    if tuned is not None:
        result["targets"][f"{args.tunnels} idle tunnels <= 3% of a core per side"] = \
            max(tuned["client_core_pct"], tuned["gateway_core_pct"]) <= 3.0
    return result


def print_report(result: dict[str, Any]) -> None:
    meta = result["meta"]
    print(f"{meta['tunnels']} idle tunnels, {meta['seconds']} s window, {meta['rounds']} rounds, "
          f"load {meta['loadavg_before']} -> {meta['loadavg_1_5_15']}")
    for name, figures in result["variants"].items():
        print(f"  {name:<6} client {figures['client_core_pct']:5.2f}% of a core   gateway "
              f"{figures['gateway_core_pct']:5.2f}%   tunnels up {figures['tunnels_up']}   (client loop thread "
              f"{figures['client_loop_core_pct']:5.2f}%; whole client process, "
              f"benchmark threads included: {figures['client_process_core_pct']:5.2f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tunnels", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-stack", type=int, default=PER_STACK,
                        help="tunnels per router, gateway agent and client runtime (default %(default)s)")
    parser.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                        help="comma-separated subset of %(default)s")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.tunnels < 1 or args.seconds <= 0 or args.rounds < 1 or args.per_stack < 1:
        parser.error("--tunnels, --per-stack, --seconds and --rounds must be positive")
    _stack.emit(run(args), print_report, args.json)


if __name__ == "__main__":
    main()
