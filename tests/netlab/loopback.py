"""STUN servers on 127.0.0.1 for tests: one that answers binding requests, one that never answers.

Real UDP and real STUN messages (aioice.stun), in a daemon thread; nothing leaves loopback.
"""
from __future__ import annotations

import socket
import threading

import aioice.stun


class StunServer:
    """A UDP socket on 127.0.0.1 that answers STUN binding requests (answering=False: reads and
    drops them, like a server behind a firewall). `requests` counts what arrived."""

    def __init__(self, answering: bool = True) -> None:
        self.answering = answering
        self.requests = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="stun-test", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"stun:127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self._sock.recvfrom(2048)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                request = aioice.stun.parse_message(data)
            except ValueError:
                continue
            if request.message_method != aioice.stun.Method.BINDING:
                continue
            self.requests += 1
            if not self.answering:
                continue
            response = aioice.stun.Message(message_method=aioice.stun.Method.BINDING,
                                           message_class=aioice.stun.Class.RESPONSE,
                                           transaction_id=request.transaction_id)
            response.attributes["XOR-MAPPED-ADDRESS"] = addr
            self._sock.sendto(bytes(response), addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()

    def __enter__(self) -> "StunServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
