"""Connect time on a real network: the lab (tests/netlab) with the signaling round trip S and the
media round trip M set apart, TLS on the router, and every new TCP+TLS connection paid for.

The client sits behind natA; a user-space delay bridge on its uplink holds TCP frames S/2 and
UDP frames M/2 each way (tests/netlab/delay.py), so HTTPS/WSS to the router costs S per round
trip and ICE/DTLS/SCTP cost M. Each connect is a fresh RouterClient (new TCP+TLS connections,
as a one-shot `pam tunnel start` has) addressed by resource; ready = the control channel open.
Profiles run interleaved:

- ours-trickle, ours-non-trickle: the defaults;
- keeper-post-pr: today's Keeper (batched candidates after the offer, WebSocket-ready wait, 0.3 s
  backend delay); keeper-pre-pr: the same with one action per candidate.

Then the dead-STUN check (on loopback, no root needed): the same connect with an unreachable STUN
server configured on both sides, against none, in both modes (target: within 1.1x).

    python benchmarks/netlab_connect.py [--signaling-rtt-ms 500] [--media-rtt-ms 100] [--runs 5]
                                        [--nat routed|cone] [--json FILE] [--skip-lab] [--skip-dead-stun]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from commander_pam_plugin import protocol, rtc  # noqa: E402
from commander_pam_plugin.loop import BackgroundLoop  # noqa: E402
from commander_pam_plugin.negotiation import ConnectOptions, RouterClient, open_session  # noqa: E402

PROFILES: dict[str, ConnectOptions] = {
    "ours-trickle": ConnectOptions(trickle=True),
    "ours-non-trickle": ConnectOptions(trickle=False),
    "keeper-post-pr": ConnectOptions(trickle=True, candidates_in_offer=False, legacy_ws_ready_wait=True,
                                     legacy_backend_delay_s=0.3),
    "keeper-pre-pr": ConnectOptions(trickle=True, candidates_in_offer=False, legacy_ws_ready_wait=True,
                                    legacy_backend_delay_s=0.3, legacy_per_candidate=True),
}
TARGET_FLOOR_RATIO = 1.25
TARGET_DEAD_STUN_RATIO = 1.1


MEDIA_ROUND_TRIPS = 4.5  # the model's k (docs: ICE 1.5, DTLS 2, SCTP 2, less 0.5 hidden under signaling)


def floor_ms(s_ms: float, m_ms: float, media_round_trips: float = MEDIA_ROUND_TRIPS) -> float:
    """The written floor: a fresh TCP (1 S) + TLS 1.3 (1 S) connection, the offer (1 S), then the
    media round trips no signaling can hide (k = 4.5; the run also measures it at S = 0)."""
    return 3 * s_ms + media_round_trips * m_ms


def _connect_ms(loop: BackgroundLoop, url: str, token: str, ca_file: str | None, options: ConnectOptions,
                ice_servers: list[Any], addresses: list[str]) -> float:
    started = time.perf_counter()
    router = RouterClient(url, token, ca_file=ca_file)
    try:
        session = open_session(loop, router, None, "echo", protocol.SessionRequest(), ice_servers=ice_servers,
                               host_addresses=addresses, options=options)
        elapsed = (time.perf_counter() - started) * 1000
        session.close()
        return elapsed
    finally:
        router.close()


def _series(run: Callable[[str], float], names: list[str], runs: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(runs):
        for name in names:  # interleaved: A B C D A B C D ...
            results[name].append(run(name))
    return results


def lab_run(s_ms: float, m_ms: float, runs: int, nat: str) -> dict[str, Any]:
    from netlab.lab import CLIENT_IP, run_in_netns
    from netlab.stack import LabStack

    kind = "none" if nat == "routed" else "cone"
    ice = [] if nat == "routed" else ["stun"]
    with tempfile.TemporaryDirectory() as work, LabStack(Path(work), client_nat=kind, gateway_nat=kind,
                                                          gateway_ice=ice, delay_udp_ms=m_ms / 2,
                                                          delay_tcp_ms=s_ms / 2) as stack:
        servers = rtc.ice_servers_from_config([stack.ice(i) for i in ice])
        token, ca = stack.user_token(), str(stack.ca.ca_file)

        def client() -> dict[str, list[float]]:
            loop = BackgroundLoop()  # its thread is started here, inside the client's namespace
            try:
                _connect_ms(loop, stack.router_url, token, ca, PROFILES["ours-trickle"], servers, [CLIENT_IP])  # warm-up
                return _series(lambda name: _connect_ms(loop, stack.router_url, token, ca, PROFILES[name],
                                                        servers, [CLIENT_IP]), list(PROFILES), runs)
            finally:
                loop.stop()
        return run_in_netns(stack.lab.ns("cli"), client)


def dead_stun_run(runs: int) -> dict[str, list[float]]:
    from gateway_support import EchoServer, make_config
    from netlab.loopback import StunServer
    from commander_pam_plugin.gateway.embedded import EmbeddedGateway

    results: dict[str, list[float]] = {}
    with EchoServer() as echo, StunServer(answering=False) as dead:
        resources = [{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}]
        for label, servers in (("none", []), ("dead-stun", [dead.url])):
            with EmbeddedGateway(make_config(resources, ice_servers=servers)) as gw:
                loop = BackgroundLoop()
                try:
                    for mode in ("trickle", "non-trickle"):
                        options = ConnectOptions(trickle=mode == "trickle")
                        configured = rtc.ice_servers_from_config(servers)
                        _connect_ms(loop, gw.router_url, gw.user_token("alice"), None, options, configured, ["127.0.0.1"])
                        results[f"{mode}/{label}"] = [
                            _connect_ms(loop, gw.router_url, gw.user_token("alice"), None, options, configured,
                                        ["127.0.0.1"]) for _ in range(runs)]
                finally:
                    loop.stop()
    return results


def _median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signaling-rtt-ms", type=float, default=500.0)
    parser.add_argument("--media-rtt-ms", type=float, default=100.0)
    parser.add_argument("--media-round-trips", type=float, default=MEDIA_ROUND_TRIPS,
                        help="k in the floor 3 S + k M (the model's 4.5 by default)")
    parser.add_argument("--skip-media-only", action="store_true", help="do not measure k at S = 0")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--nat", choices=("routed", "cone"), default="routed")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--skip-lab", action="store_true")
    parser.add_argument("--skip-dead-stun", action="store_true")
    args = parser.parse_args()
    report: dict[str, Any] = {"signaling_rtt_ms": args.signaling_rtt_ms, "media_rtt_ms": args.media_rtt_ms,
                              "nat": args.nat, "runs": args.runs}
    if not args.skip_lab:
        k = args.media_round_trips
        if not args.skip_media_only:  # the media part alone (S = 0), against no delay at all: k measured
            media_only = lab_run(0.0, args.media_rtt_ms, args.runs, args.nat)
            zero = lab_run(0.0, 0.0, args.runs, args.nat)
            report["media_only_ms"] = {n: _median(v) for n, v in media_only.items()}
            report["zero_delay_ms"] = {n: _median(v) for n, v in zero.items()}
            measured = {n: (_median(media_only[n]) - _median(zero[n])) / args.media_rtt_ms
                        for n in ("ours-trickle", "ours-non-trickle")}
            report["measured_media_round_trips"] = measured
            print("media round trips measured at S = 0: " + ", ".join(f"{n} {v:.2f}" for n, v in measured.items()))
        report["media_round_trips"] = k
        results = lab_run(args.signaling_rtt_ms, args.media_rtt_ms, args.runs, args.nat)
        floor = floor_ms(args.signaling_rtt_ms, args.media_rtt_ms, k)
        report["floor_ms"] = floor
        report["profiles"] = {name: {"median_ms": _median(v), "min_ms": min(v), "max_ms": max(v), "samples": v}
                              for name, v in results.items()}
        ours = {n: _median(results[n]) for n in ("ours-trickle", "ours-non-trickle")}
        print(f"S = {args.signaling_rtt_ms:g} ms, M = {args.media_rtt_ms:g} ms, TLS charged, {args.nat}; "
              f"floor = 3 S + {k:.2f} M = {floor:.0f} ms")
        print(f"{'profile':18} {'median':>8} {'min':>8} {'max':>8} {'/floor':>7}")
        for name, values in results.items():
            print(f"{name:18} {_median(values):8.0f} {min(values):8.0f} {max(values):8.0f} "
                  f"{_median(values) / floor:7.2f}")
        for name, median in ours.items():
            met = median / floor <= TARGET_FLOOR_RATIO
            print(f"target {name} <= {TARGET_FLOOR_RATIO} x floor: {median / floor:.2f} {'met' if met else 'MISSED'}")
        print(f"keeper-post-pr / ours-trickle: {_median(results['keeper-post-pr']) / ours['ours-trickle']:.2f}; "
              f"keeper-pre-pr / ours-trickle: {_median(results['keeper-pre-pr']) / ours['ours-trickle']:.2f}")
    if not args.skip_dead_stun:
        dead = dead_stun_run(args.runs * 2)
        report["dead_stun_ms"] = {n: {"median_ms": _median(v), "samples": v} for n, v in dead.items()}
        for mode in ("trickle", "non-trickle"):
            ratio = _median(dead[f"{mode}/dead-stun"]) / _median(dead[f"{mode}/none"])
            print(f"target dead STUN {mode} <= {TARGET_DEAD_STUN_RATIO} x without: "
                  f"{_median(dead[f'{mode}/dead-stun']):.1f} / {_median(dead[f'{mode}/none']):.1f} ms = {ratio:.2f} "
                  f"{'met' if ratio <= TARGET_DEAD_STUN_RATIO else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
