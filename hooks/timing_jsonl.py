"""Example plugin: append every connect-timing event as one JSON line to $PAM_TIMING_JSONL.

    PAM_TIMING_JSONL=/tmp/timing.jsonl commander-shell --plugin hooks/timing_jsonl.py pam launch web-1

Each line is {"label", "phase", "step_ms", "total_ms", "summary", "time"} ("time" is Unix
seconds), so runs can be compared with jq or pandas. Nothing is written if the variable is unset.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from typing import Any

from commander_pam_plugin.hookspecs import hookimpl

_lock = threading.Lock()  # checkpoints arrive from several threads; keep lines whole


@hookimpl
def pam_connect_timing(event: Any) -> None:
    path = os.environ.get("PAM_TIMING_JSONL")
    if not path:
        return
    line = json.dumps({**dataclasses.asdict(event), "time": time.time()}, sort_keys=True)
    with _lock, open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
