"""A one-line connect-phase indicator on stderr, so a slow connect never looks like a hang.

It draws only on a terminal (a log file or a pipe must not collect carriage returns) and it
is erased, for good, before the first byte of remote output so it can never mix with a prompt.
"""
from __future__ import annotations

import threading
from typing import TextIO

from .terminal import terminal_size

_CLEAR_TO_EOL = "\x1b[K"


class ProgressIndicator:
    """Rewrites one stderr line naming the current connect phase; safe to call from any thread."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._active = _isatty(stream)
        self._shown = False

    def phase(self, name: str) -> None:
        """Show `name` as the current phase; a no-op off a terminal or after clear()."""
        with self._lock:
            if not self._active:
                return
            cols, _ = terminal_size(self._stream.fileno())
            # Never wider than the terminal: a wrapped line could not be rewritten with \r.
            text = f"connecting: {name}..."[: max(cols - 1, 0)]
            self._write(f"\r{text}{_CLEAR_TO_EOL}")
            self._shown = self._active

    def clear(self) -> None:
        """Erase the line and stop drawing: late phase() calls must not land in remote output."""
        with self._lock:
            if self._shown:
                self._write(f"\r{_CLEAR_TO_EOL}")
            self._active = False
            self._shown = False

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # stderr went away: progress is not worth failing for
            self._active = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
