"""Connect time on a real network: the lab (tests/netlab) with the signaling round trip S and the
media round trip M set apart, TLS on the router, and every new TCP+TLS connection paid for.

The client sits behind natA; a user-space delay bridge on its uplink holds TCP frames S/2 and
UDP frames M/2 each way (tests/netlab/delay.py), so HTTPS/WSS to the router costs S per round
trip and ICE/DTLS/SCTP cost M. Each connect is a fresh RouterClient (new TCP+TLS connections,
as a one-shot `pam tunnel start` has) addressed by resource; ready = the control channel open.
`pam launch` runs too (resource 'ssh', a demo SSH server in the gateway's namespace): ready = the
first remote byte, as launch.py defines it. Profiles run interleaved:

- ours-trickle, ours-non-trickle: the defaults; ours-trickle-answer-on-stream (tunnel only): the
  trickle path that takes the answer from the conversation stream, as clients did before the
  offer's reply carried it;
- tunnel-warm (ours only): the same RouterClient for every connect, as an interactive shell
  has: its HTTPS connection is kept alive, so the offer costs 1 S (floor S + k M) while the
  per-conversation stream is still a fresh TCP+TLS+upgrade (3 S): here an answer taken from the
  stream would sit on the critical path;
- keeper-post-pr: today's Keeper (batched candidates after the offer, WebSocket-ready wait, 0.3 s
  backend delay); keeper-pre-pr: the same with one action per candidate.

Then the dead-STUN check (on loopback, no root needed): the same connect with an unreachable STUN
server configured on both sides, against none, in both modes (target: within 1.1x).

    python benchmarks/netlab_connect.py [--signaling-rtt-ms 500] [--media-rtt-ms 100] [--runs 5]
                                        [--commands tunnel,launch,tunnel-warm] [--nat routed|cone] [--json FILE] [--skip-lab] [--skip-dead-stun]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
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
    # the trickle path before the answer rode in the offer's reply: it came on the stream
    "ours-trickle-answer-on-stream": ConnectOptions(trickle=True, answer_in_reply=False),
    "keeper-post-pr": ConnectOptions(trickle=True, candidates_in_offer=False, legacy_ws_ready_wait=True,
                                     legacy_backend_delay_s=0.3),
    "keeper-pre-pr": ConnectOptions(trickle=True, candidates_in_offer=False, legacy_ws_ready_wait=True,
                                    legacy_backend_delay_s=0.3, legacy_per_candidate=True),
}
TARGET_FLOOR_RATIO = 1.25
TARGET_DEAD_STUN_RATIO = 1.1


MEDIA_ROUND_TRIPS = 4.5  # the model's k (docs: ICE 1.5, DTLS 2, SCTP 2, less 0.5 hidden under signaling)
COMMANDS = ("tunnel", "launch", "tunnel-warm")
WARM_PROFILES = ("ours-trickle", "ours-non-trickle", "ours-trickle-answer-on-stream")
LAUNCH_PROFILES = ("ours-trickle", "ours-non-trickle", "keeper-post-pr", "keeper-pre-pr")
OURS = ("ours-trickle", "ours-non-trickle")
CHECKPOINTS = ("offer_created", "offer_acked", "answer_received", "ice_connected", "data_channel_open")
FIRST_BYTE_TIMEOUT_S = 30.0


def floor_ms(s_ms: float, m_ms: float, media_round_trips: float = MEDIA_ROUND_TRIPS) -> float:
    """The written floor: a fresh TCP (1 S) + TLS 1.3 (1 S) connection, the offer (1 S), then the
    media round trips no signaling can hide (k = 4.5; the run also measures it at S = 0)."""
    return 3 * s_ms + media_round_trips * m_ms


def launch_floor_ms(s_ms: float, m_ms: float, media_round_trips: float = MEDIA_ROUND_TRIPS) -> float:
    """`pam launch` to its first remote byte: the same 3 S + k M, nothing more. The gateway starts the
    SSH connect (handshake, auth, the shell's start-up) when the offer arrives, ~0.5 S + k M before
    the client's channel opens, and SSH runs on the gateway's side with no delay; the first byte
    then rides the SCTP handshake's last leg. So none of the target's work is on the critical path
    of a correct client and gateway, and a path that puts it there (SSH started after the channel,
    a prompt held back) misses this floor by the SSH handshake and the shell's start-up."""
    return floor_ms(s_ms, m_ms, media_round_trips)


def warm_floor_ms(s_ms: float, m_ms: float, media_round_trips: float = MEDIA_ROUND_TRIPS) -> float:
    """A shell that connected a moment ago keeps its HTTPS connection to the router alive: the
    offer is then one round trip (1 S), no TCP or TLS handshake, before the same media part."""
    return s_ms + media_round_trips * m_ms


class _Checkpoints:
    """The connect's timing checkpoints, ms from the start (negotiation's own names)."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.at: dict[str, float] = {}

    def checkpoint(self, name: str) -> None:
        self.at.setdefault(name, (time.perf_counter() - self.started) * 1000)


def _connect_ms(loop: BackgroundLoop, url: str, token: str, ca_file: str | None, options: ConnectOptions,
                ice_servers: list[Any], addresses: list[str], command: str = "tunnel",
                kept: RouterClient | None = None) -> tuple[float, dict[str, float]]:
    """One connect: with a new RouterClient (new TCP+TLS connections), or on `kept`, one whose
    HTTPS connection is alive from an earlier connect (tunnel-warm). tunnel: ready = the control
    channel open; launch: ready = the first remote byte, shown no earlier than connect() returns
    (launch.py's ready_for_prompt: earlier bytes wait in a buffer until then)."""
    started = time.perf_counter()
    marks = _Checkpoints(started)
    router = kept or RouterClient(url, token, ca_file=ca_file)
    first = threading.Event()
    stamp: list[float] = []

    def on_peer(peer: Any) -> None:
        def on_message(message: Any) -> None:
            if isinstance(message, bytes) and not first.is_set():
                stamp.append(time.perf_counter())
                first.set()
        peer.terminal.on("message", on_message)

    try:
        if command == "launch":
            request = protocol.SessionRequest(mode="terminal", term="xterm-256color", cols=80, rows=24, pty=True)
            session = open_session(loop, router, None, "ssh", request, ice_servers=ice_servers,
                                   host_addresses=addresses, options=options, timing=marks, on_peer=on_peer)
            connected = time.perf_counter()
            try:
                if not first.wait(FIRST_BYTE_TIMEOUT_S):
                    raise RuntimeError(f"no output from the ssh target within {FIRST_BYTE_TIMEOUT_S:g} s")
            finally:
                session.close()
            return (max(stamp[0], connected) - started) * 1000, marks.at
        session = open_session(loop, router, None, "echo", protocol.SessionRequest(), ice_servers=ice_servers,
                               host_addresses=addresses, options=options, timing=marks)
        elapsed = (time.perf_counter() - started) * 1000
        session.close()
        return elapsed, marks.at
    finally:
        if kept is None:
            router.close()


Sample = tuple[float, dict[str, float]]


def _series(run: Callable[[str, str], Sample], plan: list[tuple[str, str]], runs: int) -> dict[str, list[Sample]]:
    """plan: (command, profile) pairs; results keyed 'command/profile', interleaved A B C A B C ..."""
    results: dict[str, list[Sample]] = {f"{c}/{p}": [] for c, p in plan}
    for _ in range(runs):
        for command, name in plan:
            results[f"{command}/{name}"].append(run(command, name))
    return results


def _plan(commands: tuple[str, ...]) -> list[tuple[str, str]]:
    plan = [("tunnel", name) for name in PROFILES] if "tunnel" in commands else []
    plan += [("launch", name) for name in LAUNCH_PROFILES] if "launch" in commands else []
    return plan + ([("tunnel-warm", name) for name in WARM_PROFILES] if "tunnel-warm" in commands else [])


def lab_run(s_ms: float, m_ms: float, runs: int, nat: str,
            commands: tuple[str, ...] = ("tunnel",)) -> dict[str, list[Sample]]:
    from netlab.lab import CLIENT_IP, run_in_netns
    from netlab.stack import LabStack

    kind = "none" if nat == "routed" else "cone"
    ice = [] if nat == "routed" else ["stun"]
    with tempfile.TemporaryDirectory() as work, LabStack(Path(work), client_nat=kind, gateway_nat=kind,
                                                          gateway_ice=ice, delay_udp_ms=m_ms / 2,
                                                          delay_tcp_ms=s_ms / 2,
                                                          ssh_target="launch" in commands) as stack:
        servers = rtc.ice_servers_from_config([stack.ice(i) for i in ice])
        token, ca = stack.user_token(), str(stack.ca.ca_file)

        def client() -> dict[str, list[Sample]]:
            loop = BackgroundLoop()  # its thread is started here, inside the client's namespace
            kept = RouterClient(stack.router_url, token, ca_file=ca)

            def run(command: str, name: str) -> Sample:
                warm = command == "tunnel-warm"
                return _connect_ms(loop, stack.router_url, token, ca, PROFILES[name], servers, [CLIENT_IP],
                                   "tunnel" if warm else command, kept if warm else None)
            try:
                for command in commands:  # warm-up, one of each command (and kept's connection)
                    run(command, "ours-trickle")
                return _series(run, _plan(commands), runs)
            finally:
                kept.close()
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
                                        ["127.0.0.1"])[0] for _ in range(runs)]
                finally:
                    loop.stop()
    return results


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _meta() -> dict[str, Any]:
    """Where the figures came from: the machine is shared, so its load goes with them."""
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu_model": cpu,
            "cpu_count": os.cpu_count(), "load_average_start": list(os.getloadavg()),
            "python": sys.version.split()[0]}


def _checkpoint_medians(samples: list[Sample]) -> dict[str, float]:
    return {name: round(_median([marks[name] for _, marks in samples]), 1)
            for name in CHECKPOINTS if all(name in marks for _, marks in samples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signaling-rtt-ms", type=float, default=500.0)
    parser.add_argument("--media-rtt-ms", type=float, default=100.0)
    parser.add_argument("--media-round-trips", type=float, default=MEDIA_ROUND_TRIPS,
                        help="k in the floor 3 S + k M (the model's 4.5 by default)")
    parser.add_argument("--skip-media-only", action="store_true", help="do not measure k at S = 0")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--commands", default="tunnel,launch,tunnel-warm",
                        help="comma-separated: tunnel, launch, tunnel-warm (a kept-alive router connection)")
    parser.add_argument("--nat", choices=("routed", "cone"), default="routed")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--skip-lab", action="store_true")
    parser.add_argument("--skip-dead-stun", action="store_true")
    args = parser.parse_args()
    commands = tuple(c for c in COMMANDS if c in args.commands.split(","))
    report: dict[str, Any] = {"meta": _meta(), "signaling_rtt_ms": args.signaling_rtt_ms,
                              "media_rtt_ms": args.media_rtt_ms, "nat": args.nat, "runs": args.runs,
                              "commands": list(commands)}
    if not args.skip_lab:
        k = args.media_round_trips
        if not args.skip_media_only:  # the media part alone (S = 0), against no delay at all: k measured
            media_only = lab_run(0.0, args.media_rtt_ms, args.runs, args.nat)
            zero = lab_run(0.0, 0.0, args.runs, args.nat)
            report["media_only_ms"] = {n: _median([t for t, _ in v]) for n, v in media_only.items()}
            report["zero_delay_ms"] = {n: _median([t for t, _ in v]) for n, v in zero.items()}
            measured = {n: (report["media_only_ms"][f"tunnel/{n}"] - report["zero_delay_ms"][f"tunnel/{n}"])
                        / args.media_rtt_ms for n in OURS}
            report["measured_media_round_trips"] = measured
            print("media round trips measured at S = 0: " + ", ".join(f"{n} {v:.2f}" for n, v in measured.items()))
        report["media_round_trips"] = k
        results = lab_run(args.signaling_rtt_ms, args.media_rtt_ms, args.runs, args.nat, commands)
        floors = {"tunnel": floor_ms(args.signaling_rtt_ms, args.media_rtt_ms, k),
                  "launch": launch_floor_ms(args.signaling_rtt_ms, args.media_rtt_ms, k),
                  "tunnel-warm": warm_floor_ms(args.signaling_rtt_ms, args.media_rtt_ms, k)}
        report["floor_ms"] = floors["tunnel"]
        report["launch_floor_ms"] = floors["launch"]
        report["warm_floor_ms"] = floors["tunnel-warm"]
        report["profiles"] = {}
        for key, samples in results.items():
            times = [t for t, _ in samples]
            floor = floors[key.split("/")[0]]
            report["profiles"][key] = {"median_ms": _median(times), "min_ms": min(times), "max_ms": max(times),
                                       "ratio_to_floor": round(_median(times) / floor, 3) if floor else None,
                                       "samples": times,
                                       "checkpoints_median_ms": _checkpoint_medians(samples)}
        report["meta"]["load_average_end"] = list(os.getloadavg())
        print(f"S = {args.signaling_rtt_ms:g} ms, M = {args.media_rtt_ms:g} ms, TLS charged, {args.nat}; "
              f"floor = 3 S + {k:.2f} M = {floors['tunnel']:.0f} ms (tunnel and launch), "
              f"S + {k:.2f} M = {floors['tunnel-warm']:.0f} ms (tunnel-warm)")
        print(f"{'command/profile':38} {'median':>8} {'min':>8} {'max':>8} {'/floor':>7}  checkpoints (median ms)")
        for key, entry in report["profiles"].items():
            marks = " ".join(f"{n}={v:.0f}" for n, v in entry["checkpoints_median_ms"].items())
            ratio = f"{entry['ratio_to_floor']:7.2f}" if entry["ratio_to_floor"] is not None else "      -"
            print(f"{key:38} {entry['median_ms']:8.0f} {entry['min_ms']:8.0f} {entry['max_ms']:8.0f} {ratio}  {marks}")
        ratios: dict[str, float] = {}
        targets: dict[str, bool] = {}
        for command in commands:
            ours = report["profiles"][f"{command}/ours-trickle"]["median_ms"]
            for name in OURS:
                ratio = report["profiles"][f"{command}/{name}"]["ratio_to_floor"]
                if ratio is None:
                    continue  # S = M = 0: no floor to compare with
                targets[f"{command}/{name} <= {TARGET_FLOOR_RATIO} x floor"] = ratio <= TARGET_FLOOR_RATIO
            if command == "tunnel-warm":
                continue  # no Keeper profile here: the comparison is the answer's path
            for keeper in ("keeper-post-pr", "keeper-pre-pr"):
                ratios[f"{command}/{keeper} / ours-trickle"] = round(
                    report["profiles"][f"{command}/{keeper}"]["median_ms"] / ours, 2)
        report["ratios"], report["targets"] = ratios, targets
        for name, value in ratios.items():
            print(f"{name}: {value:.2f}")
        for name, met in targets.items():
            print(f"target {name}: {'met' if met else 'MISSED'}")
    if not args.skip_dead_stun:
        dead = dead_stun_run(args.runs * 2)
        report["dead_stun_ms"] = {n: {"median_ms": _median(v), "samples": v} for n, v in dead.items()}
        for mode in ("trickle", "non-trickle"):
            ratio = _median(dead[f"{mode}/dead-stun"]) / _median(dead[f"{mode}/none"])
            print(f"target dead STUN {mode} <= {TARGET_DEAD_STUN_RATIO} x without: "
                  f"{_median(dead[f'{mode}/dead-stun']):.1f} / {_median(dead[f'{mode}/none']):.1f} ms = {ratio:.2f} "
                  f"{'met' if ratio <= TARGET_DEAD_STUN_RATIO else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
