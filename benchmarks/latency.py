"""Request/response latency through direct TCP, `ssh -L`, a stock pam tunnel and a tuned one, in one run.

Two loads, each interleaved over the four paths (A B C D A B C D ...), medians of --rounds:
- 1-byte echo: one connection, TCP_NODELAY, --echoes round trips of one byte to the echo
  target (benchmarks/tcp_target.py), from a separate process; p50 / p99 in microseconds;
- redis-benchmark GET with one client (-c 1) against a private redis-server on 127.0.0.1
  (Debian's redis-server and redis-tools), requests per second.
All on 127.0.0.1, no added delay; every process shares this machine's cores, so read the ratios
measured in the same run (the JSON keeps the CPU model and the load average before and after).

    python benchmarks/latency.py [--rounds 3] [--echoes 2000] [--redis-requests 20000] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _paths
import _stack


def echo_load(port: int, rounds: int) -> dict[str, float]:
    """(in the load process) `rounds` 1-byte round trips on one connection; p50/p99/mean in us."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples = []
    for index in range(rounds + 50):  # the first 50 warm the path up
        started = time.perf_counter()
        sock.sendall(b"x")
        if sock.recv(1) != b"x":
            raise RuntimeError("the echo did not come back")
        if index >= 50:
            samples.append((time.perf_counter() - started) * 1e6)
    sock.close()
    return {"p50_us": _stack.percentile(samples, 0.5), "p99_us": _stack.percentile(samples, 0.99),
            "mean_us": statistics.fmean(samples)}


def run_echo(port: int, rounds: int) -> dict[str, float]:
    result = subprocess.run([sys.executable, __file__, "--echo-load", str(port), "--echoes", str(rounds)],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"echo through {port} failed: {result.stderr[-400:]}")
    return json.loads(result.stdout)


def run_redis(port: int, requests: int) -> float:
    result = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", "1", "-n", str(requests),
                             "-t", "get", "--csv"], capture_output=True, text=True, timeout=300)
    for line in result.stdout.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0].upper().startswith("GET"):
            return float(cells[1])
    raise RuntimeError(f"redis-benchmark through {port}: {result.stdout[-300:]} {result.stderr[-300:]}")


class Redis:
    """A private redis-server on 127.0.0.1 (no persistence), with one key to GET."""

    def __init__(self) -> None:
        if not shutil.which("redis-server") or not shutil.which("redis-benchmark"):
            raise RuntimeError("apt-get install -y redis-server redis-tools")
        self.port = _paths.free_port()
        self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no", "--protected-mode", "yes"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _paths.wait_port(self.port)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def run(args: argparse.Namespace) -> dict[str, Any]:
    meta_before = _stack.machine()
    echo: dict[str, list[dict[str, float]]] = {}
    redis: dict[str, list[float]] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pam-latency-") as tmp:
        workdir = Path(tmp)
        redis_server = Redis() if not args.no_redis else None
        extra = ([{"name": "redis", "kind": "tcp", "host": "127.0.0.1", "port": redis_server.port}]
                 if redis_server else [])
        resources = ["echo"] + (["redis"] if redis_server else [])
        ssh = stock = tuned = None
        try:
            stock = _paths.PamPath(workdir, "0", resources, extra)
            tuned = _paths.PamPath(workdir, "1", resources, extra)
            ssh = _paths.SshForward(workdir)
            echo_ports = {"direct": tuned.stack.tcp_ports["echo"], "ssh -L": ssh.forward(tuned.stack.tcp_ports["echo"]),
                          "pam stock": stock.port("echo"), "pam tuned": tuned.port("echo")}
            redis_ports = {}
            if redis_server:
                redis_ports = {"direct": redis_server.port, "ssh -L": ssh.forward(redis_server.port),
                               "pam stock": stock.port("redis"), "pam tuned": tuned.port("redis")}
            for round_index in range(args.rounds):
                for path, port in echo_ports.items():
                    echo.setdefault(path, []).append(run_echo(port, args.echoes))
                for path, port in redis_ports.items():
                    redis.setdefault(path, []).append(run_redis(port, args.redis_requests))
                print(f"round {round_index + 1} done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
        finally:
            for part in (ssh, tuned, stock, redis_server):
                if part is not None:
                    part.close()
    return report(echo, redis, args, meta_before, time.monotonic() - started)


def report(echo: dict[str, list[dict[str, float]]], redis: dict[str, list[float]], args: argparse.Namespace,
           meta_before: dict[str, Any], elapsed: float) -> dict[str, Any]:
    meta = {**_stack.machine(), "loadavg_before": meta_before["loadavg_1_5_15"], "rounds": args.rounds,
            "echoes": args.echoes, "redis_requests": args.redis_requests, "elapsed_s": round(elapsed, 1),
            "note": "all on 127.0.0.1; every process shares the machine's cores; medians over rounds"}
    result: dict[str, Any] = {"meta": meta, "echo_1_byte": {}, "redis_get_c1": {}, "ratios": {}, "targets": {}}
    for path, samples in echo.items():
        result["echo_1_byte"][path] = {key: round(statistics.median(s[key] for s in samples), 1)
                                       for key in ("p50_us", "p99_us", "mean_us")}
        result["echo_1_byte"][path]["samples_p50_us"] = [round(s["p50_us"], 1) for s in samples]
    for path, samples in redis.items():
        result["redis_get_c1"][path] = {"rps": round(statistics.median(samples), 1),
                                        "samples": [round(s, 1) for s in samples]}
    e, r = result["echo_1_byte"], result["redis_get_c1"]
    if "ssh -L" in e:
        for variant in ("pam stock", "pam tuned"):
            result["ratios"][f"echo p50 {variant} / ssh -L"] = round(e[variant]["p50_us"] / e["ssh -L"]["p50_us"], 3)
        result["ratios"]["echo p50 tuned / stock"] = round(e["pam tuned"]["p50_us"] / e["pam stock"]["p50_us"], 3)
        result["targets"]["echo p50 pam tuned <= 1.5 x ssh -L"] = result["ratios"]["echo p50 pam tuned / ssh -L"] <= 1.5
    if "ssh -L" in r:
        for variant in ("pam stock", "pam tuned"):
            result["ratios"][f"redis GET {variant} / ssh -L"] = round(r[variant]["rps"] / r["ssh -L"]["rps"], 3)
        result["targets"]["redis GET -c1 pam tuned >= 0.5 x ssh -L"] = \
            result["ratios"]["redis GET pam tuned / ssh -L"] >= 0.5
    return result


def print_report(result: dict[str, Any]) -> None:
    meta = result["meta"]
    print(f"{meta['rounds']} rounds, {meta['echoes']} echoes each, load {meta['loadavg_before']} -> "
          f"{meta['loadavg_1_5_15']}, {meta['cpu']}")
    print("path        echo p50 us   p99 us   redis GET -c1 rps")
    for path, figures in result["echo_1_byte"].items():
        rps = result["redis_get_c1"].get(path, {}).get("rps")
        print(f"{path:<11} {figures['p50_us']:11.1f} {figures['p99_us']:8.1f}   {rps if rps is not None else '-':>10}")
    for name, value in result["ratios"].items():
        print(f"  {name}: {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--echoes", type=int, default=2000)
    parser.add_argument("--redis-requests", type=int, default=20000)
    parser.add_argument("--no-redis", action="store_true", help="skip redis-benchmark")
    parser.add_argument("--echo-load", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if args.echo_load:
        print(json.dumps(echo_load(args.echo_load, args.echoes)))
        return
    if args.rounds < 1 or args.echoes < 1:
        parser.error("--rounds and --echoes must be >= 1")
    _stack.emit(run(args), print_report, args.json)


if __name__ == "__main__":
    main()
