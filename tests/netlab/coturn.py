"""coturn (Debian's `turnserver`) as the lab's STUN and TURN server: UDP, TCP and TLS.

Started per test with a fresh user and password, on one address (127.0.0.1, or an address
inside a lab namespace via `prefix=["ip", "netns", "exec", NAME]`), never on a wildcard.
Ready when it answers a STUN binding request; stopped (and waited for) on close.
"""
from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Sequence

import aioice.stun

BINARY = "turnserver"


def available() -> bool:
    return shutil.which(BINARY) is not None


class Coturn:
    """One turnserver process. urls() gives the ICE server entries a client or gateway config takes."""

    def __init__(self, address: str, workdir: Path, *, port: int = 3478, tls_port: int = 5349,
                 cert: Path | None = None, key: Path | None = None, prefix: Sequence[str] = (),
                 allow_loopback_peers: bool = False) -> None:
        self.address, self.port, self.tls_port = address, port, tls_port
        self.username, self.password = "lab-" + secrets.token_hex(4), secrets.token_urlsafe(16)
        self.log_path = workdir / f"turnserver-{address}-{port}.log"
        args = [*prefix, BINARY, "-n", f"--listening-ip={address}", f"--relay-ip={address}",
                f"--listening-port={port}", f"--user={self.username}:{self.password}", "--realm=netlab",
                "--lt-cred-mech", "--no-cli", "--fingerprint", "--no-multicast-peers",
                f"--log-file={self.log_path}", "--simple-log", f"--pidfile={workdir / f'turn-{port}.pid'}",
                "--min-port=49152", "--max-port=49407", "--no-dtls", "--verbose"]
        if cert is not None and key is not None:
            args += [f"--tls-listening-port={tls_port}", f"--cert={cert}", f"--pkey={key}"]
        else:
            args += ["--no-tls"]
        if allow_loopback_peers:
            args.append("--allow-loopback-peers")
        self._prefix = list(prefix)
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float = 10.0) -> None:
        """Until a STUN binding request is answered (from the same namespace as the server)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"turnserver exited with {self.process.returncode}; see {self.log_path}")
            if self._prefix:
                probe = subprocess.run([*self._prefix, "python3", "-c", _PROBE, self.address, str(self.port)],
                                       capture_output=True, timeout=5)
                if probe.returncode == 0:
                    return
            elif binding_answered(self.address, self.port, 0.2):
                return
            time.sleep(0.05)  # polling a starting process: no event to wait on
        raise RuntimeError(f"turnserver on {self.address}:{self.port} did not answer within {timeout:g} s")

    def stun_url(self) -> str:
        return f"stun:{self.address}:{self.port}"

    def turn(self, transport: str = "udp") -> dict[str, str]:
        return {"urls": f"turn:{self.address}:{self.port}?transport={transport}",
                "username": self.username, "credential": self.password}

    def turns(self, host: str | None = None) -> dict[str, str]:
        return {"urls": f"turns:{host or self.address}:{self.tls_port}?transport=tcp",
                "username": self.username, "credential": self.password}

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def __enter__(self) -> "Coturn":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def binding_answered(host: str, port: int, timeout: float) -> bool:
    """True if a STUN binding request to host:port (UDP) is answered within timeout."""
    request = aioice.stun.Message(message_method=aioice.stun.Method.BINDING,
                                  message_class=aioice.stun.Class.REQUEST)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(bytes(request), (host, port))
            data, _ = sock.recvfrom(2048)
        except OSError:
            return False
    try:
        return aioice.stun.parse_message(data).transaction_id == request.transaction_id
    except ValueError:
        return False


_PROBE = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.3)
req = bytes.fromhex("000100002112a442") + b"netlabprobe1"
s.sendto(req, (host, port))
try:
    data, _ = s.recvfrom(2048)
except OSError:
    sys.exit(1)
sys.exit(0 if data[8:20] == b"netlabprobe1" else 1)
"""
