"""A local client of a tunnel that sends nothing and reads until EOF (exit 0) or 30 s (exit 1)."""
from __future__ import annotations

import socket
import sys


def main() -> int:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30) as sock:
        while sock.recv(65536):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
