"""A real TCP client for tunnel tests: send N MiB of seeded random bytes to an echo service
through 127.0.0.1:PORT, read the echo to EOF, compare sha256. Exit 0 if intact, 1 if not."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from client_support import echo_roundtrip, payload, sha256  # noqa: E402


def main() -> int:
    port, mib = int(sys.argv[1]), int(sys.argv[2])
    data = payload(mib * 1024 * 1024, seed=mib)
    echoed = echo_roundtrip(port, data)
    intact = sha256(echoed) == sha256(data)
    print(f"sent {len(data)} received {len(echoed)} sha256 {'match' if intact else 'MISMATCH'} {sha256(data)}")
    return 0 if intact else 1


if __name__ == "__main__":
    sys.exit(main())
