"""The throughput benchmark's load: N parallel bulk transfers to a port, in their own process.

A real user of a tunnel (psql, scp, a browser) is another process; running the load inside the
client's process would make its threads fight the plugin's loop thread for the GIL. Talks the
bulk protocol of benchmarks/tcp_target.py; every transfer is sha256-checked. Prints one JSON
line: {"mbps": aggregate MB/s (10^6 bytes/s) over the wall time, "bytes": total}.

    python benchmarks/tcp_load.py --port P --bulk-port B --direction upload|download --mib 64 --connections 4
"""
from __future__ import annotations

import argparse
import hashlib
import json
import socket
import threading
import time

from tcp_target import make_payload

BLOCK = 1 << 20


def _request(port: int, line: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.sendall(line.encode() + b"\n")
    return sock


def _read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        block = sock.recv(256)
        if not block:
            break
        line += block
    return line.strip()


def upload(port: int, payload: bytes, digest: str) -> None:
    """PUT: send payload; the target answers the sha256 of what it got."""
    with _request(port, f"PUT {len(payload)}") as sock:
        view = memoryview(payload)
        for offset in range(0, len(view), BLOCK):
            sock.sendall(view[offset:offset + BLOCK])
        answer = _read_line(sock).decode()
    if answer != digest:
        raise RuntimeError(f"upload of {len(payload)} bytes arrived damaged")


def prepare(bulk_port: int, size: int, seed: int) -> None:
    """Have the target make a download's bytes ahead, so making them is not timed."""
    with _request(bulk_port, f"PREP {size} {seed}") as sock:
        if _read_line(sock) != b"ok":
            raise RuntimeError("the target did not prepare the download")


def download(port: int, size: int, seed: int, digest: str) -> None:
    """GET a prepared payload and check its sha256."""
    hasher, received = hashlib.sha256(), 0
    buffer = bytearray(BLOCK)
    with _request(port, f"GET {size} {seed}") as sock:
        while count := sock.recv_into(buffer):
            hasher.update(memoryview(buffer)[:count])
            received += count
    if received != size or hasher.hexdigest() != digest:
        raise RuntimeError(f"download arrived damaged: {received} of {size} bytes")


def run(port: int, bulk_port: int, direction: str, total: int, connections: int) -> dict[str, float]:
    size = total // connections
    payloads = [make_payload(size, seed) for seed in range(connections)]
    digests = [hashlib.sha256(p).hexdigest() for p in payloads]
    if direction == "download":
        for seed in range(connections):
            prepare(bulk_port, size, seed)
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            if direction == "upload":
                upload(port, payloads[index], digests[index])
            else:
                download(port, size, index, digests[index])
        except BaseException as exc:  # reported below, after the others finished
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(connections)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} of {connections} transfers failed: {errors[0]}")
    return {"mbps": size * connections / wall / 1e6, "bytes": size * connections}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="where to send (the target or a tunnel)")
    parser.add_argument("--bulk-port", type=int, required=True, help="the target itself (to prepare downloads)")
    parser.add_argument("--direction", choices=("upload", "download"), required=True)
    parser.add_argument("--mib", type=int, default=64, help="MiB in all, split over the connections")
    parser.add_argument("--connections", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(run(args.port, args.bulk_port, args.direction, args.mib << 20, args.connections)), flush=True)


if __name__ == "__main__":
    main()
