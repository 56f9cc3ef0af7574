"""Bulk throughput and CPU per MB through direct TCP, `ssh -L`, a stock pam tunnel and a tuned one, in one run.

Each round moves --mib MiB upload and download over one connection through every path, one
after another (A B C D A B C D ...), with the load in its own process (benchmarks/tcp_load.py,
sha256-checked). For the pam paths it also reports the CPU milliseconds per MB that the client
process (this one: the plugin's runtime runs here) and the gateway agent process spent; the
stock and tuned paths each have their own client runtime, so the client CPU is measured for
this whole process while only that path moves data. Medians over --rounds; the JSON keeps the
CPU model and the load average before and after. Everything shares this machine's cores: read
the ratios measured in the same run.

    python benchmarks/dataplane_compare.py [--mib 32] [--rounds 3] [--json FILE]
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
from throughput import transfer


def run(args: argparse.Namespace) -> dict[str, Any]:
    meta_before = _stack.machine()
    mbps: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict[str, dict[str, list[float]]]] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pam-compare-") as tmp:
        workdir = Path(tmp)
        ssh = stock = tuned = None
        try:
            stock = _paths.PamPath(workdir, "0", ["bulk"], [])
            tuned = _paths.PamPath(workdir, "1", ["bulk"], [])
            ssh = _paths.SshForward(workdir)
            paths: dict[str, tuple[int, int, Any]] = {
                "direct": (tuned.stack.tcp_ports["bulk"], tuned.stack.tcp_ports["bulk"], None),
                "ssh -L": (ssh.forward(tuned.stack.tcp_ports["bulk"]), tuned.stack.tcp_ports["bulk"], None),
                "pam stock": (stock.port("bulk"), stock.stack.tcp_ports["bulk"], stock),
                "pam tuned": (tuned.port("bulk"), tuned.stack.tcp_ports["bulk"], tuned)}
            megabytes = args.mib * (1 << 20) / 1e6
            for round_index in range(args.rounds):
                for direction in ("upload", "download"):
                    for path, (port, bulk_port, pam) in paths.items():
                        before = (_stack.process_cpu_seconds(os.getpid()), pam.agent.cpu_seconds() if pam else 0.0)
                        figure = transfer(port, bulk_port, direction, args.mib, 1)
                        mbps.setdefault(direction, {}).setdefault(path, []).append(figure)
                        if pam is not None:
                            sides = cpu.setdefault(direction, {}).setdefault(path, {})
                            spent = (_stack.process_cpu_seconds(os.getpid()) - before[0],
                                     pam.agent.cpu_seconds() - before[1])
                            for side, seconds in zip(("client", "gateway"), spent):
                                sides.setdefault(side, []).append(seconds * 1000 / megabytes)
                print(f"round {round_index + 1} done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
        finally:
            for part in (ssh, tuned, stock):
                if part is not None:
                    part.close()
    return report(mbps, cpu, args, meta_before, time.monotonic() - started)


def report(mbps: dict[str, Any], cpu: dict[str, Any], args: argparse.Namespace, meta_before: dict[str, Any],
           elapsed: float) -> dict[str, Any]:
    meta = {**_stack.machine(), "loadavg_before": meta_before["loadavg_1_5_15"], "mib": args.mib,
            "rounds": args.rounds, "elapsed_s": round(elapsed, 1),
            "unit": "MB/s = 10^6 bytes/s over one connection; CPU ms per MB moved; medians over rounds",
            "note": "all on 127.0.0.1; client, gateway, sshd, targets and load share the machine's cores"}
    result: dict[str, Any] = {"meta": meta, "mbps": {}, "cpu_ms_per_mb": {}, "ratios": {}, "targets": {}}
    for direction, paths in mbps.items():
        result["mbps"][direction] = {path: {"median": round(statistics.median(v), 2), "samples": [round(x, 2) for x in v]}
                                     for path, v in paths.items()}
        result["cpu_ms_per_mb"][direction] = {
            path: {side: round(statistics.median(v), 2) for side, v in sides.items()}
            for path, sides in cpu[direction].items()}
        m, c = result["mbps"][direction], result["cpu_ms_per_mb"][direction]
        ratio = m["pam tuned"]["median"] / m["pam stock"]["median"]
        result["ratios"][f"{direction} MB/s tuned / stock"] = round(ratio, 3)
        result["ratios"][f"{direction} MB/s tuned / ssh -L"] = round(m["pam tuned"]["median"] / m["ssh -L"]["median"], 4)
        result["targets"][f"{direction} tuned >= 2 x stock MB/s"] = ratio >= 2.0
        for side in ("client", "gateway"):
            cpu_ratio = c["pam tuned"][side] / c["pam stock"][side]
            result["ratios"][f"{direction} CPU/MB {side} tuned / stock"] = round(cpu_ratio, 3)
            result["targets"][f"{direction} CPU/MB {side} tuned <= 0.5 x stock"] = cpu_ratio <= 0.5
    return result


def print_report(result: dict[str, Any]) -> None:
    meta = result["meta"]
    print(f"{meta['mib']} MiB x {meta['rounds']} rounds, load {meta['loadavg_before']} -> {meta['loadavg_1_5_15']}, "
          f"{meta['cpu']}")
    print("direction  path         MB/s     CPU ms/MB client  gateway")
    for direction, paths in result["mbps"].items():
        for path, figures in paths.items():
            sides = result["cpu_ms_per_mb"][direction].get(path, {})
            print(f"{direction:<10} {path:<10} {figures['median']:8.1f}     {sides.get('client', float('nan')):12.1f} "
                  f"{sides.get('gateway', float('nan')):8.1f}")
    for name, value in result["ratios"].items():
        print(f"  {name}: {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if args.mib < 1 or args.rounds < 1:
        parser.error("--mib and --rounds must be >= 1")
    _stack.emit(run(args), print_report, args.json)


if __name__ == "__main__":
    main()
