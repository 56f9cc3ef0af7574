"""`pam launch` resume: time from the media path being restored to the first resumed byte.

In the network lab (tests/netlab, root only): the real CLI on a pseudo-terminal in the client's
namespace, router (HTTPS) in 'pub', gateway and a demo SSH server in 'gw', routed (no NAT). A
user-space delay bridge on the client's uplink holds UDP frames D each way (media round trip
2 D) and TCP frames S/2 each way (signaling round trip S, by default 4 D: the ~500 ms per request
production sees at D = 125 ms, as benchmarks/latency_proxy.py models it).

The remote shell prints a line every 50 ms. Each run drops every UDP packet in the client's
namespace (iptables there) until the client has noticed the loss and `--cut-s` has passed, then
removes the rule: the figure is from that removal to the first remote byte the client's terminal
shows afterwards (output the gateway held, replayed). The client was then between resume attempts
(backoff) or in one whose ICE checks were failing: both are part of what a user waits for.

    python benchmarks/resume.py [--one-way-ms 125] [--signaling-rtt-ms 500] [--runs 5] [--cut-s 6]
                                [--json benchmarks/results/DATE-resume.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import pexpect  # noqa: E402

from _stack import machine, summary  # noqa: E402
from netlab.lab import unavailable_reason  # noqa: E402
from netlab.stack import LabStack  # noqa: E402
from test_netlab_resume import udp_cut  # noqa: E402


def measure(one_way_ms: float, signaling_rtt_ms: float, runs: int, cut_s: float) -> dict[str, list[float]]:
    restore_to_byte: list[float] = []
    loss_to_resumed: list[float] = []
    with tempfile.TemporaryDirectory() as workdir, LabStack(
            Path(workdir), client_nat="none", gateway_nat="none", with_turn=False, ssh_target=True,
            delay_udp_ms=one_way_ms, delay_tcp_ms=signaling_rtt_ms / 2) as stack:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAM_")}
        env.update(PAM_CONFIG=str(stack.client_config(timeout_s=60)), TERM="xterm-256color")
        child = pexpect.spawn("ip", ["netns", "exec", stack.lab.ns("cli"), sys.executable, "-m",
                                     "commander_pam_plugin.shell", "pam", "launch", "ssh"],
                              env=env, dimensions=(30, 160), encoding="utf-8", timeout=90)
        try:
            child.sendline("n=0; while :; do n=$((n+1)); echo tick-$n; sleep 0.05; done")
            for _ in range(runs):
                child.expect(r"tick-\d+\r\n")
                cut_at = time.monotonic()
                with udp_cut(stack.lab):
                    child.expect(r"re-establishing")  # ticks before it were in flight before the cut
                    time.sleep(max(0.0, cut_s - (time.monotonic() - cut_at)))  # the outage itself
                restored = time.monotonic()
                first_byte = resumed = None
                while first_byte is None or resumed is None:  # the client's notice may come first
                    if child.expect([r"tick-", r"re-established after ([\d.]+) s"]) == 0:
                        first_byte = first_byte or time.monotonic()
                    else:
                        resumed = float(child.match.group(1)) * 1000
                restore_to_byte.append((first_byte - restored) * 1000)
                loss_to_resumed.append(resumed)
            child.sendcontrol("c")
            child.sendline("exit")
            child.expect(pexpect.EOF)
        finally:
            child.close(force=True)
    return {"restore_to_first_resumed_byte_ms": restore_to_byte, "loss_noticed_to_resumed_ms": loss_to_resumed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one-way-ms", type=float, default=125.0, help="D: media one-way delay")
    parser.add_argument("--signaling-rtt-ms", type=float, default=None, help="S (default 4 D)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cut-s", type=float, default=6.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        print(f"benchmarks/resume.py: {reason}", file=sys.stderr)
        return 2
    signaling = args.signaling_rtt_ms if args.signaling_rtt_ms is not None else 4 * args.one_way_ms
    figures = measure(args.one_way_ms, signaling, args.runs, args.cut_s)
    report = {"benchmark": "resume", "one_way_ms": args.one_way_ms, "media_rtt_ms": 2 * args.one_way_ms,
              "signaling_rtt_ms": signaling, "cut_s": args.cut_s, "runs": args.runs,
              **{name: summary(values) for name, values in figures.items()}, "meta": machine()}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
