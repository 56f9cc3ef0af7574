"""The one exception type a command raises to fail with a clear line and an exit status."""
from __future__ import annotations


class PamError(Exception):
    """A user-facing failure: the shell prints `error: <message>` on one line and exits `status`."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
