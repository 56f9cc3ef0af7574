"""Connect latency: `pam tunnel start` and `pam launch`, legacy vs trickle vs non-trickle, beside the floor.

Router, gateway agents and targets run as separate processes on 127.0.0.1; latency proxies put a
one-way delay D on client<->router and gateway<->router (one action round trip = 4 D); media stays
on loopback. Profiles run interleaved (A B C A B C ...):

- legacy: the seed's starting point, against a gateway without batch support (capabilities
  ["trickle"]): candidates stripped from the offer and sent one action each, one after another,
  after a WebSocket-ready wait plus a 0.3 s backend delay before the offer;
- trickle, non-trickle: ours.

Ready is the first byte echoed through the tunnel (tunnel) or the first remote byte on the
terminal channel, `ready_for_prompt` (launch), timed from before the resource is resolved.
"Warm" (the headline) is a shell that resolved resources a moment ago; "cold" is a fresh
runtime, which knows no resource yet and addresses its offer to the resource name. The floor is measured in the same run: one no-op
`ping` action through the proxies plus the same command and profile at D = 0.

    python benchmarks/connect.py [--one-way-ms 125] [--runs 10] [--host-addresses 8] [--json FILE]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _stack
from commander_pam_plugin.negotiation import ConnectOptions, new_conversation_id
from commander_pam_plugin.timing import ConnectTiming

MAIN, LEGACY = "gw-main", "gw-legacy"
COMMANDS = ("tunnel", "launch")
OURS = ("trickle", "non-trickle")
PROFILES = ("legacy", *OURS)
TARGET_FLOOR_RATIO = 1.25
TARGET_LEGACY_RATIO = 5.0


def options_for(profile: str) -> ConnectOptions:
    """The client's connect options per profile (legacy: the documented compatibility settings)."""
    if profile == "legacy":
        return ConnectOptions(trickle=True, candidates_in_offer=False, legacy_per_candidate=True,
                              legacy_ws_ready_wait=True, legacy_backend_delay_s=0.3)
    return ConnectOptions(trickle=profile == "trickle")


@dataclass
class Sample:
    ready_ms: float
    conversation_id: str
    phases: dict[str, float]


@dataclass
class Series:
    """Every sample of one (command, profile, condition)."""

    samples: list[Sample] = field(default_factory=list)

    def ready(self) -> list[float]:
        return [s.ready_ms for s in self.samples]


class ConnectBench:
    """One client runtime against the stack; measures connects and pings, keeps every sample."""

    def __init__(self, stack: _stack.Stack, addresses: tuple[str, ...]) -> None:
        self.stack = stack
        self.addresses = addresses
        self.runtime = stack.runtime(addresses)
        self.one_way_s = 0.0
        self.series: dict[tuple[str, str, str], Series] = {}
        self.pings: dict[str, list[float]] = {"d": [], "d0": []}

    def set_delay(self, seconds: float) -> None:
        self.one_way_s = seconds
        self.stack.set_one_way(seconds)

    def measure(self, command: str, profile: str, condition: str, record: bool = True) -> None:
        """One connect to ready; closed afterwards with D = 0 (closing is not timed, only waited for)."""
        cold = condition == "cold"
        runtime = self.stack.runtime(self.addresses) if cold else self.runtime
        if not cold:
            _stack.refresh_resources(runtime)
        suffix = "-legacy" if profile == "legacy" else ""
        resource = ("echo" if command == "tunnel" else "ssh") + suffix
        options = options_for(profile)
        timing = ConnectTiming(f"{command}:{profile}")
        start = time.perf_counter()
        sock = tunnel = session = None
        try:
            if command == "tunnel":
                tunnel = _stack.open_tunnel(runtime, resource, options, timing)
                sock = _stack.first_echo(tunnel.port)
                ready = time.perf_counter()
                session = tunnel.session
            else:
                session, ready = _stack.open_launch(runtime, resource, options, timing)
        finally:
            delay = self.one_way_s
            self.stack.set_one_way(0.0)
            if sock is not None:
                sock.close()
            if tunnel is not None:
                _stack.close_tunnel(runtime, tunnel)
            elif session is not None:
                session.close()
            if cold:
                runtime.shutdown()
            self.stack.set_one_way(delay)
        if record:
            phases = {e.phase: e.total_ms for e in timing.events}
            self.series.setdefault((command, profile, condition), Series()).samples.append(
                Sample((ready - start) * 1000, session.conversation_id, phases))

    def ping(self, key: str) -> None:
        """One no-op action through both proxies: the signaling part of the floor."""
        router = self.runtime.router()
        start = time.perf_counter()
        router.action(MAIN, "ping", new_conversation_id(), {}, False)
        self.pings[key].append((time.perf_counter() - start) * 1000)


def run(args: argparse.Namespace) -> dict[str, Any]:
    addresses = _stack.host_addresses(args.host_addresses)
    one_way = args.one_way_ms / 1000
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pam-bench-") as tmp, \
            _stack.Stack(Path(tmp), [_stack.GatewaySpec(MAIN), _stack.GatewaySpec(LEGACY, ["trickle"], "-legacy")],
                         gateway_addresses=addresses) as stack:
        bench = ConnectBench(stack, addresses)
        try:
            for command in COMMANDS:  # warm-up: first-use costs (imports, first SSH login) are not figures
                for profile in PROFILES:
                    bench.measure(command, profile, "warm", record=False)
            for index in range(args.runs):
                bench.set_delay(one_way)
                for command in COMMANDS:
                    for profile in PROFILES:
                        bench.measure(command, profile, "warm")
                bench.ping("d")
                if not args.no_cold:
                    for command in COMMANDS:
                        for profile in OURS:
                            bench.measure(command, profile, "cold")
                bench.set_delay(0.0)
                for command in COMMANDS:
                    for profile in OURS:
                        bench.measure(command, profile, "d0")
                bench.ping("d0")
                print(f"run {index + 1}/{args.runs} done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
            stats = stack.router_stats()["conversations"]
        finally:
            bench.runtime.shutdown()
    return report(bench, stats, args, time.monotonic() - started)


def _actions(series: Series, stats: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Signaling actions the router counted per connect, up to ready (the close comes after)."""
    per_connect = []
    kinds: Counter[str] = Counter()
    for sample in series.samples:
        counts = {k: v for k, v in stats.get(sample.conversation_id, {}).items() if k != "close"}
        per_connect.append(sum(counts.values()))
        kinds.update(counts)
    n = max(len(series.samples), 1)
    return {"median": statistics.median(per_connect) if per_connect else None,
            "per_kind": {k: round(v / n, 2) for k, v in sorted(kinds.items())}}


def _phases(series: Series) -> dict[str, float]:
    names = dict.fromkeys(p for s in series.samples for p in s.phases)
    return {p: round(statistics.median(s.phases[p] for s in series.samples if p in s.phases), 1) for p in names}


def report(bench: ConnectBench, stats: dict[str, dict[str, int]], args: argparse.Namespace,
           elapsed: float) -> dict[str, Any]:
    ping, ping0 = _stack.summary(bench.pings["d"]), _stack.summary(bench.pings["d0"])
    result: dict[str, Any] = {
        "meta": {**_stack.machine(), "one_way_ms": args.one_way_ms, "runs": args.runs,
                 "host_addresses": args.host_addresses, "elapsed_s": round(elapsed, 1),
                 "latency": "one-way D on client<->router and gateway<->router (action round trip = 4 D); "
                            "ICE/DTLS/SCTP and targets on loopback, no added delay",
                 "warm": "shell resolved resources a moment ago (headline)",
                 "cold": "fresh runtime: no resource known; the offer goes to POST /api/v1/resources/NAME/actions "
                         "and its reply names the gateway",
                 "floor": "median ping action at D + median of the same command and profile at D = 0"},
        "ping_ms": ping, "ping_ms_d0": ping0, "ratios": {}, "targets": {}}
    for command in COMMANDS:
        section: dict[str, Any] = {}
        legacy_median = _stack.summary(bench.series[(command, "legacy", "warm")].ready())["median"]
        for profile in PROFILES:
            warm = bench.series[(command, profile, "warm")]
            entry: dict[str, Any] = {"ready_ms": _stack.summary(warm.ready()), "actions": _actions(warm, stats),
                                     "phases_ms": _phases(warm)}
            if profile in OURS:
                d0 = _stack.summary(bench.series[(command, profile, "d0")].ready())
                entry["ready_ms_d0"] = d0
                entry["phases_ms_d0"] = _phases(bench.series[(command, profile, "d0")])
                if (command, profile, "cold") in bench.series:
                    entry["ready_ms_cold"] = _stack.summary(bench.series[(command, profile, "cold")].ready())
                floor = ping["median"] + d0["median"]
                median = entry["ready_ms"]["median"]
                entry["floor_ms"] = round(floor, 2)
                entry["ratio_to_floor"] = round(median / floor, 3)
                entry["ratio_legacy_over_this"] = round(legacy_median / median, 2)
                key = f"{command}_{profile.replace('-', '_')}"
                result["ratios"][f"{key}_ratio_to_floor"] = entry["ratio_to_floor"]
                result["ratios"][f"{key}_ratio_legacy_over_this"] = entry["ratio_legacy_over_this"]
                result["targets"][f"{key}_ratio_to_floor <= {TARGET_FLOOR_RATIO}"] = \
                    entry["ratio_to_floor"] <= TARGET_FLOOR_RATIO
                result["targets"][f"{key}_ratio_legacy_over_this >= {TARGET_LEGACY_RATIO:g}"] = \
                    entry["ratio_legacy_over_this"] >= TARGET_LEGACY_RATIO
            section[profile] = entry
        result[command] = section
    return result


def print_report(result: dict[str, Any]) -> None:
    meta = result["meta"]
    print(f"D = {meta['one_way_ms']:g} ms one way (action round trip ~{4 * meta['one_way_ms']:g} ms), "
          f"{meta['host_addresses']} host addresses, {meta['runs']} runs, {meta['elapsed_s']:g} s; "
          f"ping {result['ping_ms']['median']} ms (D = 0: {result['ping_ms_d0']['median']} ms)")
    for command in COMMANDS:
        print(f"\n{command}: time to ready (ms)          median      min      max  actions  "
              f"D=0 med  cold med   floor  /floor  legacy/")
        for profile in PROFILES:
            e = result[command][profile]
            r = e["ready_ms"]
            extra = ""
            if profile in OURS:
                cold = e.get("ready_ms_cold", {}).get("median")
                extra = (f" {e['ready_ms_d0']['median']:8.1f}  {cold if cold is not None else '-':>8} "
                         f"{e['floor_ms']:7.1f}  {e['ratio_to_floor']:6.3f}  {e['ratio_legacy_over_this']:6.2f}")
            print(f"  {profile:<30} {r['median']:8.1f} {r['min']:8.1f} {r['max']:8.1f} "
                  f"{e['actions']['median']:8}{extra}")
    print("\ntargets:")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one-way-ms", type=float, default=125.0, help="injected one-way delay D (default 125)")
    parser.add_argument("--runs", type=int, default=10, help="measured rounds of every profile (default 10)")
    parser.add_argument("--host-addresses", type=int, default=8, help="ICE host addresses on each side (default 8)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold (fresh runtime) measurements")
    parser.add_argument("--json", metavar="FILE", help="write every figure to this JSON file")
    args = parser.parse_args()
    if args.runs < 1 or args.one_way_ms < 0:
        parser.error("--runs must be >= 1 and --one-way-ms >= 0")
    _stack.emit(run(args), print_report, args.json)


if __name__ == "__main__":
    main()
