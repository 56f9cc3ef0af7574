"""Peer reuse: a second `pam tunnel start` to another resource of a gateway with a live peer.

Router, gateway agent and targets run as separate processes (benchmarks/_stack.py); latency
proxies put a one-way delay D on client<->router and gateway<->router, so one action round trip
is about 4 D. The client is a PamRuntime with peer reuse on, as in the pam agent. Each run: a
fresh runtime starts a tunnel to `echo` (a full negotiation), then one to `bulk` on the same
gateway (reused peer), each timed to the target's first answer byte; a no-op `ping` action is the yardstick.

    python benchmarks/agent_reuse.py [--one-way-ms 125] [--runs 5]
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _stack  # noqa: E402

from commander_pam_plugin.negotiation import new_conversation_id  # noqa: E402
from commander_pam_plugin.runtime import ResourceRef  # noqa: E402

GATEWAY = "gw-main"


def _first_byte_ms(runtime, resource: str, start: float) -> float:
    tunnel = runtime.start_tunnel(None, ResourceRef(resource, GATEWAY), "127.0.0.1", 0, trickle=True)
    with socket.create_connection(("127.0.0.1", tunnel.port), timeout=30) as sock:
        if resource == "echo":
            sock.sendall(b"x")
            sock.recv(1)
        else:  # bulk: PREP answers one line
            sock.sendall(b"PREP 1 1\n")
            sock.recv(3)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one-way-ms", type=float, default=125.0)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    first: list[float] = []
    second: list[float] = []
    pings: list[float] = []
    with tempfile.TemporaryDirectory() as folder, _stack.Stack(Path(folder), [_stack.GatewaySpec(GATEWAY)],
                                                               ssh=False) as stack:
        stack.set_one_way(args.one_way_ms / 1000)
        for _ in range(args.runs):
            runtime = stack.runtime(("127.0.0.1",))
            runtime.reuse_peers = True
            try:
                start = time.perf_counter()
                runtime.router().action(GATEWAY, "ping", new_conversation_id(), {}, False)
                pings.append((time.perf_counter() - start) * 1000)
                first.append(_first_byte_ms(runtime, "echo", time.perf_counter()))
                second.append(_first_byte_ms(runtime, "bulk", time.perf_counter()))
            finally:
                runtime.shutdown()
    result = {"one_way_ms": args.one_way_ms, "runs": args.runs,
              "action_round_trip_ms": statistics.median(pings),
              "first_tunnel_ms": statistics.median(first), "reused_peer_tunnel_ms": statistics.median(second),
              "reused_over_round_trip": statistics.median(second) / statistics.median(pings)}
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
