"""python -m commander_pam_plugin.agent --socket PATH [--ready-fd N] [--detach]: run the agent."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from .server import serve


def main() -> int:
    parser = argparse.ArgumentParser(prog="commander-pam-agent")
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--ready-fd", type=int, default=None)
    parser.add_argument("--detach", action="store_true", help="fork into a new session and return at once")
    parser.add_argument("--idle", type=float, default=None, help="exit after this many seconds with no tunnel")
    args = parser.parse_args()
    if args.detach:
        if os.fork():
            os._exit(0)  # the starter reaps us; the grandchild is nobody's zombie
        os.setsid()

    def on_term(signum: int, frame: Any) -> NoReturn:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(args.socket, args.ready_fd, args.idle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
