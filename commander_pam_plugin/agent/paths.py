"""Where the agent's socket lives: the user's runtime directory, private to the user."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import PamError

SOCKET_ENV = "PAM_AGENT_SOCKET"  # overrides the whole path (tests use one per test)
SOCKET_NAME = "agent.sock"


def runtime_dir() -> Path:
    """$XDG_RUNTIME_DIR/commander-pam, else /tmp/commander-pam-<uid>; created 0700."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    directory = Path(base) / "commander-pam" if base else Path(f"/tmp/commander-pam-{os.getuid()}")
    return directory


def socket_path() -> Path:
    override = os.environ.get(SOCKET_ENV)
    return Path(override) if override else runtime_dir() / SOCKET_NAME


def ensure_private_dir(directory: Path) -> None:
    """Create the socket's directory 0700, or refuse one that another user could enter or own."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.lstat()
    except OSError as exc:
        raise PamError(f"cannot create the agent's directory {directory}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise PamError(f"the agent's directory {directory} is not a directory owned by you; remove it")
    if info.st_mode & 0o077:
        raise PamError(f"the agent's directory {directory} is open to other users (mode "
                       f"{stat.S_IMODE(info.st_mode):o}); run chmod 700 on it")
