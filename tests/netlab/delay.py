"""A user-space delaying bridge: the lab's stand-in for netem (this kernel has none).

Runs inside a namespace holding two veth ends (no addresses: a pure layer-2 bridge). Every frame
read on one end is written, unchanged, to the other after a delay that depends on what it
carries: UDP (the media path: ICE, DTLS, SCTP, STUN) waits --udp-ms, TCP (signaling: HTTPS, WSS)
waits --tcp-ms, anything else (ARP) passes at once. So a benchmark sets the media round trip
M = 2 * udp-ms apart from the signaling round trip S = 2 * tcp-ms.

    ip netns exec NS python delay.py IFACE_A IFACE_B --udp-ms 50 --tcp-ms 250

It prints "ready" once both sockets are bound and runs until killed.
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import struct
import sys

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4


def _delay_s(frame: bytes, udp_s: float, tcp_s: float) -> float:
    if len(frame) < 34 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
        return 0.0
    proto = frame[23]
    return udp_s if proto == 17 else tcp_s if proto == 6 else 0.0


def _open(iface: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((iface, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.setblocking(False)
    return sock


async def bridge(a: str, b: str, udp_s: float, tcp_s: float) -> None:
    loop = asyncio.get_running_loop()
    socks = {a: _open(a), b: _open(b)}

    def forward(src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                frame, address = src.recvfrom(65535)
            except BlockingIOError:
                return
            if address[2] == PACKET_OUTGOING:  # our own write, seen again on that end
                continue
            delay = _delay_s(frame, udp_s, tcp_s)
            if delay:
                loop.call_later(delay, _send, dst, frame)
            else:
                _send(dst, frame)

    loop.add_reader(socks[a].fileno(), forward, socks[a], socks[b])
    loop.add_reader(socks[b].fileno(), forward, socks[b], socks[a])
    print("ready", flush=True)
    await asyncio.Event().wait()


def _send(sock: socket.socket, frame: bytes) -> None:
    try:
        sock.send(frame)
    except OSError:
        pass  # a full queue drops the frame, as a router would


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--udp-ms", type=float, default=0.0)
    parser.add_argument("--tcp-ms", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(bridge(args.a, args.b, args.udp_ms / 1000, args.tcp_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
