"""The running gateway's local control socket: `pam-gateway sessions / terminate / pending / approve / deny`.

A Unix socket, mode 0600 in a 0700 directory, and every connection's peer credentials
(SO_PEERCRED) must be the gateway's own uid: whoever may run the gateway may govern it, nobody
else. One JSON line in, one JSON line out (the agent's wire format).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import pwd
import socket
import stat
from pathlib import Path
from typing import Any

from ..agent.creds import peer_uid
from ..errors import PamError
from ..protocol import ProtocolError
from .governance import Governor

log = logging.getLogger(__name__)

MAX_LINE = 16 * 1024
OPS = ("sessions", "pending", "terminate", "approve", "deny")


def default_socket_path(gateway: str) -> Path:
    """$XDG_RUNTIME_DIR/pam-gateway/NAME.sock, else /tmp/pam-gateway-UID/NAME.sock."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    directory = Path(base) / "pam-gateway" if base else Path(f"/tmp/pam-gateway-{os.getuid()}")
    return directory / f"{gateway}.sock"


class ControlServer:
    """Serves the control ops for one gateway's Governor on its event loop."""

    def __init__(self, path: Path, governor: Governor) -> None:
        self.path, self.governor = path, governor
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        _private_dir(self.path.parent)
        if self.path.exists():
            if _answers(self.path):
                raise OSError(f"another gateway already serves the control socket {self.path}")
            self.path.unlink()  # left behind by a gateway that died
        old = os.umask(0o177)  # created 0600, never briefly wider
        try:
            self._server = await asyncio.start_unix_server(self._serve, str(self.path), limit=MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        log.info("control socket %s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            try:
                self.path.unlink()
            except OSError:
                pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock: socket.socket = writer.get_extra_info("socket")
            uid = peer_uid(sock)
            if uid != os.getuid():
                log.warning("control socket: refused a connection from uid %d", uid)
                answer: dict[str, Any] = {"ok": False, "error": "this control socket serves only the gateway's user"}
            else:
                try:
                    line = await asyncio.wait_for(reader.readline(), 10)
                    answer = await self.handle(json.loads(line), _user_name(uid))
                except (ValueError, UnicodeDecodeError, asyncio.LimitOverrunError):
                    answer = {"ok": False, "error": "a request is one JSON object on one line"}
                except ProtocolError as exc:
                    answer = {"ok": False, "error": exc.message}
            writer.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
            await writer.drain()
        except (OSError, asyncio.TimeoutError):
            pass
        except Exception:  # the gateway outlives any one request
            log.exception("control request failed")
        finally:
            writer.close()

    async def handle(self, request: Any, operator: str) -> dict[str, Any]:
        if not isinstance(request, dict) or request.get("op") not in OPS:
            raise ProtocolError(400, f"unknown op; expected one of {', '.join(OPS)}")
        op = request["op"]
        if op == "sessions":
            return {"ok": True, "sessions": self.governor.listing()}
        if op == "pending":
            return {"ok": True, "pending": self.governor.approvals.listing()}
        if op == "terminate":
            which = request.get("id")
            if not isinstance(which, str):
                raise ProtocolError(400, "terminate needs a session id")
            reason = request.get("reason") if isinstance(request.get("reason"), str) else ""
            return {"ok": True, **await self.governor.terminate(which, reason, f"operator {operator}")}
        approver = request.get("approver")
        if not isinstance(approver, str) or not approver:
            raise ProtocolError(400, f"{op} needs --as APPROVER (a user the resource names as approver)")
        return {"ok": True, **self.governor.answer(approver, {"request": request.get("request"), "decision": op
                                                              if op == "deny" else "approve",
                                                              "reason": request.get("reason")})}


def request(path: Path, message: dict[str, Any], timeout: float = 15.0) -> dict[str, Any]:
    """One request to a running gateway's control socket (the CLI side)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise PamError(f"no running gateway answers on {path} ({exc.strerror or exc})") from None
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = sock.makefile("rb").readline(MAX_LINE * 64)
    try:
        answer = json.loads(data)
    except ValueError:
        raise PamError(f"the gateway at {path} sent no answer") from None
    if not isinstance(answer, dict) or answer.get("ok") is not True:
        raise PamError(str(answer.get("error") if isinstance(answer, dict) else "refused")[:300])
    return answer


def _private_dir(directory: Path) -> None:
    """The socket's folder: created 0700; one another user owns or may enter is refused (OSError)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise OSError(f"control socket folder {directory} is not a directory owned by this user")
    if info.st_mode & 0o077:
        raise OSError(f"control socket folder {directory} is open to other users (mode "
                      f"{stat.S_IMODE(info.st_mode):o}); run chmod 700 on it")


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
