"""Session recording in asciicast v2, the format asciinema plays back.

Only what the user saw is kept (output and resizes); keystrokes are not recorded, because they
would capture anything typed at a password prompt. Files are created 0600 in a 0700 folder.
"""
from __future__ import annotations

import codecs
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO


class AsciicastRecorder:
    """Writes one asciicast v2 file: a header line, then [t, code, data] event lines."""

    def __init__(self, path: Path, cols: int, rows: int, term: str, title: str) -> None:
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file: IO[str] | None = os.fdopen(fd, "w", encoding="utf-8")
        self._start = time.monotonic()
        # Output may split a UTF-8 sequence between two reads; decode incrementally.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._write({"version": 2, "width": cols, "height": rows, "timestamp": int(time.time()),
                     "env": {"TERM": term}, "title": title})

    @classmethod
    def create(cls, folder: Path, resource: str, conversation_id: str, cols: int, rows: int,
               term: str) -> AsciicastRecorder:
        """<folder>/<resource>-<utc time>-<conversation>.cast."""
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return cls(folder / f"{resource}-{stamp}-{conversation_id}.cast", cols, rows, term, resource)

    def _elapsed(self) -> float:
        return round(time.monotonic() - self._start, 6)

    def _write(self, item: object) -> None:
        if self._file is not None:
            self._file.write(json.dumps(item, ensure_ascii=False) + "\n")

    def output(self, data: bytes) -> None:
        text = self._decoder.decode(data)
        if text:
            self._write([self._elapsed(), "o", text])

    def resize(self, cols: int, rows: int) -> None:
        self._write([self._elapsed(), "r", f"{cols}x{rows}"])

    def marker(self, label: str) -> None:
        """An asciicast 'm' (marker) event: what happened to the session itself (held, resumed, expired)."""
        self._write([self._elapsed(), "m", label])

    def close(self) -> None:
        if self._file is None:
            return
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._write([self._elapsed(), "o", tail])
        self._file.close()
        self._file = None
