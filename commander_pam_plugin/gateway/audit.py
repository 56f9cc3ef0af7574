"""The audit trail: one JSON line per decision, approval, session open, resume, end and termination.

Append-only (O_APPEND, mode 0600), rotated by size (audit.jsonl -> audit.jsonl.1 -> ...). Only
the fields named in FIELDS are written, so a credential or token can never ride along in a
record by accident; text fields are cut to a bounded length.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KINDS = ("decision", "approval", "open", "held", "resume", "expired", "end", "terminate")
FIELDS = ("gateway", "conversation", "request", "user", "resource", "mode", "reason", "ticket", "verdict",
          "approvers", "approver", "by", "status", "detail", "bytes", "duration_s")
MAX_TEXT = 300


class AuditTrail:
    """Appends records to `path`; with path None it writes nothing (records still reach the hooks)."""

    def __init__(self, path: Path | None, max_bytes: int, keep: int) -> None:
        self.path, self.max_bytes, self.keep = path, max_bytes, keep
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._open().close()  # a bad path fails at start, not at the first session

    def record(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Write one line; returns the record written (the hooks get the same)."""
        if kind not in KINDS:
            raise ValueError(f"unknown audit kind {kind!r}")
        entry: dict[str, Any] = {"ts": _utc_now(), "kind": kind}
        for key in FIELDS:
            value = fields.get(key)
            if value is None:
                continue
            entry[key] = value[:MAX_TEXT] if isinstance(value, str) else value
        if self.path is not None:
            line = (json.dumps(entry, separators=(",", ":"), sort_keys=False) + "\n").encode()
            with self._lock:
                try:
                    self._rotate_if_full(len(line))
                    with self._open() as handle:
                        handle.write(line)
                except OSError as exc:
                    log.error("audit trail %s: cannot write (%s)", self.path, exc.strerror)
        return entry

    def _open(self) -> Any:
        assert self.path is not None
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "ab")

    def _rotate_if_full(self, incoming: int) -> None:
        assert self.path is not None
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size == 0 or size + incoming <= self.max_bytes:
            return
        for index in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        dropped = self.path.with_name(f"{self.path.name}.{self.keep + 1}")
        if dropped.exists():
            dropped.unlink()


def _utc_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
